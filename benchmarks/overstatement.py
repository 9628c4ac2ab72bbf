"""Do certificates ever overstate? specert's certificates against 60-digit arithmetic on near-tie distributions.

For every standard rule, ``threshold:0.2`` and the engines' presets (``tests/exact.py``, ``RULES``), at least
``--cases`` distributions per rule and dtype, from float64 and float32 logits, of the family ``--family`` (default
near ties: a top logit and competitors whose gaps to it and to each other are log-uniform in [1e-12, 1e-3] or a few
units in the dtype's last place; vocabularies of 2 to 24 tokens). Each certificate of
:func:`specert.certificates` is compared with the exact one of the same float values (mpmath, 60 digits: the
water-fillings of THEORY.md sections 3-4). Counts the overstatements (certificate above the exact value: there must
be none) and the largest understatement, relative (with the exact value where it was) and absolute. The table is
printed and written to ``benchmarks/results/overstatement-<date>-<commit>.md`` (``benchmarks/results.py``).

    nice -n 19 python benchmarks/overstatement.py                  # 10^5 cases per rule and dtype
    python benchmarks/overstatement.py --cases 2000 --family near-threshold
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mpmath
import numpy as np
import torch
from results import Report  # benchmarks/results.py, beside this script

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
import exact  # noqa: E402  (tests/exact.py: the 60-digit reference and the distributions)

DTYPES = {"float64": np.float64, "float32": np.float32}


class Progress:
    """Rows compared so far, with the seconds spent, on stderr where it is a terminal."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done = name, total, 0
        self.start = time.perf_counter()
        self.show = sys.stderr.isatty()

    def __call__(self, v: int, rows: int) -> None:
        self.done += rows
        if self.show:
            print(f"\r{self.name}: {self.done}/{self.total} rows (V = {v}), {time.perf_counter() - self.start:.0f} s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000, help="least distributions per rule and dtype")
    ap.add_argument("--family", choices=exact.FAMILIES, default="near-tie")
    ap.add_argument("--dtype", choices=list(DTYPES), action="append", help="repeatable; default: both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cases < 1:
        ap.error("--cases must be >= 1")

    report = Report("overstatement")
    report.versions.update(torch=torch.__version__, numpy=np.__version__, mpmath=mpmath.__version__)
    rows_per_vocab = exact.vocabulary_rows(args.cases)
    report.print(f"{args.family} distributions, at least {args.cases} per rule and dtype; rows per vocabulary size: "
                 + ", ".join(f"V={v}: {n}" for v, n in rows_per_vocab.items()))
    report.print("exact: mpmath at 60 digits on the same float values (tests/exact.py); overstated: certificate > "
                 "exact; understatement: exact - certificate, relative to exact (the exact value beside it) and "
                 "absolute")
    report.print()
    table = []
    for name in args.dtype or list(DTYPES):
        progress = Progress(name, sum(rows_per_vocab.values()))
        tallies = exact.tally(args.family, DTYPES[name], args.cases, args.seed, progress=progress)
        progress.close()
        for spec in exact.RULES:
            t = tallies[spec]
            table.append([f"`{spec}`", name, t.cases, t.overstated, f"{t.worst_under:.3g}", f"{t.worst_under_at:.3g}",
                          f"{t.worst_under_abs:.3g}"])
            if t.overstated:
                logits, fast, value = t.example
                report.print(f"OVERSTATED {spec} {name}: certificate {fast!r} > exact {value!r} at logits "
                             f"{[float(x) for x in logits]!r}")
    report.table(["rule", "dtype", "cases", "overstated", "largest rel. understatement", "at exact",
                  "largest abs. understatement"], table)
    overstated = sum(row[3] for row in table)
    report.print()
    report.print(f"{overstated} overstatements in {sum(row[2] for row in table)} certificates")
    report.write()
    return 1 if overstated else 0


if __name__ == "__main__":
    sys.exit(main())
