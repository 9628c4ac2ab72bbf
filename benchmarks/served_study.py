"""The study on a served target against the in-process study: speed at several concurrencies, and how close the
certificates from the served top K come to the full-vocabulary ones.

The embedded SmolLM2-135M in float32 served by vLLM (``tests/vllm_server.py``: a Hugging Face folder written from
the GGUF, eager, ``VLLM_CPU_KVCACHE_SPACE=1``), the same Spec-Bench prompts on both sides, the standard rules, no
drafter. In one run:

- **speed**: the in-process study's phase 1 (batched greedy decoding with every rule's certificate,
  ``specert.study.teacher_forced.target_part``, model loaded beforehand) against the served study
  (``specert.study.evaluation.run_eval`` on the server's URL, a fresh folder each time, ``--logprobs K``) at
  concurrency 1, 4 and 16; steps per second, and each as a ratio to the in-process figure;
- **certificates**: along the server's greedy texts, the in-process model's full-vocabulary certificate of every
  step beside the served interval: the share flagged exact per rule, the largest difference where exact (the two
  engines' float32 rounding), how many intervals miss the in-process value by more than that rounding, and the
  lower end's relative distance to the exact value at the median step where not exact.

The report is printed and written to ``benchmarks/results/served_study-<date>-<commit>.md``.

    python benchmarks/served_study.py --num-prompts 32 --steps 32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import torch
from results import Report  # benchmarks/results.py, beside this script

import specert
from specert.decoding.forward import forward, new_cache
from specert.decoding.models import EMBEDDED, load_model
from specert.served.client import ServedModel
from specert.study.evaluation import EvalConfig, run_eval
from specert.study.prompts import load_prompts
from specert.study.teacher_forced import prompt_batches, target_part
from specert.theory.rules import STANDARD_RULES

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
from vllm_server import embedded_hf_folder, start_vllm, stop_vllm  # noqa: E402  (tests/vllm_server.py)

SPEC_BENCH = REPOSITORY.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
ENGINES = 2e-4  # vLLM's float32 forward against transformers': log-probabilities agree within about 1e-4


def columns(path: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(values) for name, values in pq.read_table(path).to_pydict().items()}


def in_process_steps(loaded, cfg: EvalConfig) -> tuple[int, float]:
    """(steps, seconds) of the in-process study's phase 1 on ``cfg``'s prompts, the model already loaded."""
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    encoded, batches, _ = prompt_batches(loaded, prompts, cfg)
    start = time.perf_counter()
    steps = sum(target_part(loaded, prompts, encoded, batch, cfg).num_rows for batch in batches)
    return steps, time.perf_counter() - start


def full_certificates(loaded, server: ServedModel, cfg: EvalConfig, steps: dict[str, np.ndarray]):
    """Per rule, the in-process certificate of every served step along the server's greedy text ``[S]``, in the
    order of ``steps``; and the share of steps whose greedy token the in-process model agrees with."""
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    full = {r: np.full(len(steps["step"]), np.nan) for r in cfg.rules}
    agree = 0
    for index in np.unique(steps["prompt_index"]):
        rows = np.nonzero(steps["prompt_index"] == index)[0]
        rows = rows[np.argsort(steps["step"][rows])]
        ids = server.tokenize([{"role": "user", "content": prompts[index].text}])
        tokens = steps["token"][rows].tolist()
        with torch.inference_mode():
            logits = forward(loaded.model, new_cache(loaded.model), ids + tokens[:-1])[len(ids) - 1 :]  # [T, V]
        agree += int((logits.argmax(-1) == torch.tensor(tokens)).sum())
        for r, values in specert.certificates(logits.double(), cfg.rules).items():
            full[r][rows] = values.numpy()
    return full, agree / len(steps["step"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=str(SPEC_BENCH))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--logprobs", type=int, default=20, help="K, the top log-probabilities asked per step")
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()
    report = Report("served_study")
    levels = [int(c) for c in args.concurrency.split(",")]
    base = EvalConfig(prompts=args.prompts, num_prompts=args.num_prompts, steps=args.steps, rules=STANDARD_RULES,
                      decode_prompts=0, logprobs=args.logprobs)

    loaded = load_model(EMBEDDED)
    folder = embedded_hf_folder()
    print(f"starting vLLM on {folder} ...", flush=True)
    url, pid = start_vllm(folder, ["--served-model-name", "smollm2", "--max-logprobs", str(max(args.logprobs, 20))])
    work = Path(tempfile.mkdtemp(prefix="served_study."))
    try:
        server = ServedModel(url)
        server.check()
        vllm_version = httpx.get(url.removesuffix("/v1") + "/version").json().get("version", "?")
        in_process_steps(loaded, dataclasses.replace(base, num_prompts=2, steps=4))  # warm-up
        timings = {}
        loads = [os.getloadavg()[0]]
        for label in ["in-process", *levels]:
            if label == "in-process":
                steps, seconds = in_process_steps(loaded, base)
            else:
                cfg = dataclasses.replace(base, target=url, concurrency=label)
                start = time.perf_counter()
                run_eval(cfg, work / f"c{label}", progress=False)
                seconds = time.perf_counter() - start
                steps = pq.read_table(work / f"c{label}" / "steps").num_rows
            timings[label] = (steps, seconds)
            loads.append(os.getloadavg()[0])
            print(f"{label}: {steps} steps in {seconds:.1f} s", flush=True)
        served = columns(work / f"c{levels[-1]}" / "steps")
        full, agree = full_certificates(loaded, server, base, served)
    finally:
        stop_vllm(pid)

    say = report.print
    report.versions.update({"specert": specert.__version__, "torch": torch.__version__})
    report.versions["vLLM"] = vllm_version
    say(f"vLLM in float32 (eager, one compute thread); {args.num_prompts} Spec-Bench prompts "
        f"x {args.steps} greedy steps, {len(STANDARD_RULES)} standard rules, K = {args.logprobs}; load average "
        f"(1 min) {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores")
    say()
    say("**Speed** (study steps per second: a step is one target token with every rule's certificate)")
    say()
    inside = timings["in-process"][0] / timings["in-process"][1]
    report.table(["study", "steps", "seconds", "steps/s", "x in-process"],
                 [[("in-process" if label == "in-process" else f"served, concurrency {label}"), steps,
                   f"{seconds:.1f}", f"{steps / seconds:.1f}", f"{steps / seconds / inside:.2f}"]
                  for label, (steps, seconds) in timings.items()])
    say()
    say(f"**Certificates from the served top {args.logprobs}** against the in-process model's full-vocabulary "
        f"certificates along the server's greedy texts ({len(served['step'])} steps; the in-process greedy token is "
        f"the server's at {agree:.1%} of them)")
    say()
    rows, missed = [], 0
    for r in STANDARD_RULES:
        lower, upper = served[f"cert:{r}"], served[f"cert_upper:{r}"]
        exact, want = served[f"exact:{r}"].astype(bool), full[r]
        finite = np.isfinite(want)
        miss = finite & ((lower > want + ENGINES) | (upper < want - ENGINES))
        missed += int(miss.sum())
        gap = np.abs(lower - want)[exact & finite]
        loose = ~exact & finite & (want > 0)
        distance = np.median((want[loose] - lower[loose]) / want[loose]) if loose.any() else float("nan")
        rows.append([r, f"{exact.mean():.1%}", f"{gap.max():.1e}" if len(gap) else "-", int(miss.sum()),
                     f"{distance:.1%}" if loose.any() else "-"])
    report.table(["rule", "exact share", "largest |served - in-process| where exact (nats)",
                  f"intervals missing the in-process value by > {ENGINES:g}",
                  "median (exact - lower end) / exact where not exact"], rows)
    say()
    say(f"- intervals that miss the in-process value: {missed} over {len(served['step']) * len(STANDARD_RULES)} "
        "(step, rule) pairs")
    report.write()


if __name__ == "__main__":
    main()
