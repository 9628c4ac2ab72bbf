"""The README's two commands as a new user runs them: the main job (``specert eval`` on the embedded model, the
README's options) and the fast test suite (``python3 -m pytest -q``), each timed, with the main job's tables.

The main job runs into a fresh folder (nothing resumed); ``compiled:int4`` compiles its step from inductor's cache
when an earlier run left one (say ``--cold`` to start from an empty cache, as on a fresh machine). The report, with
the machine and the load average, is printed and written to ``benchmarks/results/main-<date>-<commit>.md``.

    python benchmarks/main_job.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import Report  # benchmarks/results.py, beside this script

REPOSITORY = Path(__file__).resolve().parents[1]
MAIN_JOB = ["eval", "--num-prompts", "16", "--steps", "48", "--drafter", "int4", "--drafter", "compiled:int4",
            "--drafter", "ngram:3", "--decode-prompts", "3"]


def timed(command: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, done


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold", action="store_true", help="an empty inductor cache for the compiled drafter")
    ap.add_argument("--no-tests", action="store_true", help="time the main job only")
    args = ap.parse_args()
    report = Report("main")
    work = Path(tempfile.mkdtemp(prefix="main_job."))
    env = dict(os.environ)
    if args.cold:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    command = [sys.executable, "-m", "specert", *MAIN_JOB, "--out", str(work / "run")]
    print("running the main job ...", flush=True)
    job_seconds, job = timed(command, env)
    if job.returncode != 0:
        raise SystemExit(f"the main job failed ({job.returncode}):\n{job.stderr[-3000:]}")
    rows = [["`specert " + " ".join(MAIN_JOB) + " --out runs/main`", f"{job_seconds / 60:.1f} min",
             "cold inductor cache" if args.cold else "inductor cache as left"]]
    if not args.no_tests:
        print("running the fast test suite ...", flush=True)
        test_seconds, tests = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        summary = (tests.stdout.strip().splitlines() or ["?"])[-1].strip("= ")
        rows.append(["`python3 -m pytest -q`", f"{test_seconds / 60:.1f} min", summary])
    report.table(["command", "took", "note"], rows)
    report.print()
    report.print("**The main job's report** (`report/summary.md`)")
    report.print()
    for line in (work / "run" / "report" / "summary.md").read_text().splitlines():
        report.print(line.replace("#", "###", 1) if line.startswith("#") else line)
    report.write()


if __name__ == "__main__":
    main()
