"""What certificates cost: every standard rule alone and the set of 12 in one call, as ratios to torch.logsumexp
on the same logits, call by call (``specert.study.bench``), over three kinds of logits (standard normal, x3,
the embedded model's own), batch 1, 32 and 512, V = 49152 and 151936, float32, medians of ``--repeat`` rounds.

Goals: every single rule at most 1.5x logsumexp and the set at most 2x, at batch 32 and 512, V = 151936. The report
is printed and written to ``benchmarks/results/certificate_cost-<date>-<commit>.md``.

    python benchmarks/certificate_cost.py
"""

from __future__ import annotations

import argparse

import torch
from results import Report  # benchmarks/results.py, beside this script

import specert
from specert.study.bench import KINDS, bench_logits, model_rows, run_bench

SINGLE_GOAL, SET_GOAL = 1.5, 2.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,32,512")
    ap.add_argument("--vocab", default="49152,151936")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    report = Report("certificate_cost")
    report.versions.update({"specert": specert.__version__, "torch": torch.__version__})
    batches = [int(b) for b in args.batch.split(",")]
    vocabs = [int(v) for v in args.vocab.split(",")]
    rows = model_rows()
    say = report.print
    say(f"float32 logits, {torch.get_num_threads()} torch threads; each entry timed in {args.repeat} rounds of one "
        "call of it and one of torch.logsumexp on the same tensor: medians over the rounds")
    summary = []
    for vocab in vocabs:
        for batch in batches:
            results = {}
            for kind in KINDS:
                logits = bench_logits(kind, batch, vocab, rows=rows)
                results[kind] = run_bench(logits, args.repeat)
                print(f"[{batch}, {vocab}] {kind} done", flush=True)
            say()
            say(f"**[{batch}, {vocab}]** (logsumexp: " + ", ".join(
                f"{kind} {results[kind][0][1] * 1000:.2f} ms" for kind in KINDS) + ")")
            say()
            names = [name for name, _, _ in results[KINDS[0]]][1:]
            report.table(["what", *(f"x logsumexp, {kind}" for kind in KINDS)],
                         [[name, *(f"{dict((n, r) for n, _, r in results[kind])[name]:.2f}" for kind in KINDS)]
                          for name in names])
            for kind in KINDS:
                ratios = {n: r for n, _, r in results[kind]}
                single = max(r for n, r in ratios.items() if n in specert.STANDARD_RULES)
                together = next(r for n, r in ratios.items() if n.startswith("all "))
                summary.append([f"[{batch}, {vocab}]", kind, f"{single:.2f}", f"{together:.2f}",
                                "yes" if single <= SINGLE_GOAL and together <= SET_GOAL else "no"])
    say()
    say(f"**Summary** (goal: every single rule <= {SINGLE_GOAL}x, the set of 12 in one call <= {SET_GOAL}x)")
    say()
    report.table(["logits", "kind", "costliest single rule", "12 rules in one call", "goal met"], summary)
    report.write()


if __name__ == "__main__":
    main()
