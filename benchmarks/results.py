"""Where a benchmark writes what it measured: a Markdown file in ``benchmarks/results/``, named by the benchmark,
the date and the commit, holding the exact command, the machine (CPU model, cores, memory, load average before and
after the run), the software versions and the report's lines.

    report = Report("speed")                   # stamps the date, commit, command and load average now
    report.versions["vLLM"] = "0.32.0"
    report.print("| method | tokens/s |")      # printed, and kept for the file
    report.table(["method", "tokens/s"], [["plain", "15.2"]])
    path = report.write()                      # the load average again; results/speed-DATE-COMMIT.md
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parents[1]


def commit() -> tuple[str, bool]:
    """(the checkout's short commit, whether tracked files differ from it); ("unknown", False) outside git."""
    try:
        short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True,
                               text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPOSITORY,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return short, bool(status.strip())


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    """Total memory in GiB (``/proc/meminfo``; NaN where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table."""
    return (["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


class Report:
    """One benchmark run's report: lines printed as they come, written with the run's stamp by :meth:`write`."""

    def __init__(self, name: str, argv: list[str] | None = None):
        self.name = name
        self.started = datetime.datetime.now()
        self.command = "python " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv))
        self.commit, self.modified = commit()
        self.load_before = load_average()
        self.versions: dict[str, str] = {"Python": platform.python_version()}
        self.lines: list[str] = []

    def print(self, *parts, sep: str = " ") -> None:
        """Print a line (none: an empty line) and keep it for the file."""
        line = sep.join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def table(self, columns: list[str], rows: list[list]) -> None:
        """Print a Markdown table (and keep it)."""
        for line in markdown_table(columns, rows):
            self.print(line)

    def header(self) -> list[str]:
        """The stamp: command, commit, machine, load average before and now, duration, versions."""
        tree = " (working tree modified)" if self.modified else ""
        minutes = (datetime.datetime.now() - self.started).total_seconds() / 60
        return [
            f"# {self.name}: {self.started:%Y-%m-%d %H:%M}",
            "",
            f"- command: `{self.command}`",
            f"- commit: {self.commit}{tree}",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.1f} GiB",
            f"- load average (1 / 5 / 15 min): {self.load_before} before the run, {load_average()} after",
            f"- duration: {minutes:.1f} min",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
            "",
        ]

    def write(self, directory: Path = RESULTS) -> Path:
        """Write ``directory/NAME-DATE-COMMIT.md`` and say where; returns its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}-{self.started:%Y-%m-%d}-{self.commit}.md"
        path.write_text("\n".join(self.header() + self.lines) + "\n")
        print(f"written to {path}", flush=True)
        return path
