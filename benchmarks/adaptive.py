"""Certified (adaptive) draft shapes against fixed chains and trees and transformers' heuristic schedule.

Greedy, batch 1, Spec-Bench prompts per category, all in one run: for every prompt the target alone and every
(drafter, shape) run back to back, in an order drawn at random for each prompt (seeded), so that no config always
runs first or after the same one (``--repeats R``: R such rounds, each config's fastest kept). Reports tokens/s
relative to the target alone, mean acceptance length, and the target's verification work four ways: target tokens
per accepted token (every forward's tokens, a plain forward's too, per drafted token accepted), tokens of the
forwards that verified drafted tokens per accepted token (1 + the drafted tokens, a tree's every node, at each step
that drafted), drafted tokens per accepted one; and target tokens per generated token (the target's work per output
token: 1 for plain decoding, which verifies nothing and accepts nothing); then the certified schedules' guarantee
audit (over every round). Every config is first run once on a warm-up prompt that is not measured (a served drafter
has a history, which the certified schedules keep; each config keeps its own, as ``specert eval`` does: one drafter
serves every shape here, and a tree's timings are not a chain's to learn from), and the target alone runs twice per
round ("target again"): the ratio of two identical runs is the noise a per-category ratio carries.

A certified schedule's tokens/s over the best fixed shape's, per category, comes with a 90% interval: Student's t
over the category's prompts of the log of each prompt's ratio (paired: both ran on the same prompt, back to back),
around their geometric mean. A category where the interval lies above 1 is a win, one where it holds 1 a match
within what these prompts can tell apart, one below 1 a loss; take 4 prompts per category or more. The target
against itself (printed last) checks the method: its interval should hold 1 in about 9 categories in 10. NOTE: a t
interval, not a percentile bootstrap: over 4-6 prompts the bootstrap's interval is too narrow, and the target
against itself misses 1 in far more categories than one in ten.

"On every category" is 13 comparisons at once: two configs of equal speed have one 90% interval in 13 below 1 about
every other run (1 - 0.95^13 = 0.49), so one category below is no finding by itself. The benchmark also names the
categories below 1 by Holm's step-down procedure over all of them (one-sided t tests of the same log ratios,
family-wise error 5%: the side and level of a 90% interval's lower miss, for the 13 categories together), and checks
that procedure on the target against itself, both sides. The same interval over all prompts tells a difference too
small for any category's 6 prompts (the draft head's k=auto against k=1: the same decisions, the schedule's work).

The target's verification work (the four counts of the table) of a certified schedule over the best fixed shape's
comes with a 90% paired bootstrap interval over all prompts: each count is a ratio of sums over prompts (a prompt
that accepts little weighs little), so its interval is the bootstrap's, not a t interval of per-prompt ratios.

``--again k=1`` runs a drafter's shape a second time as a config of its own (its own history, its own place in the
order), checked like the target against itself: two runs of one drafter config differ as much as a run's drafter
state and history can make them, which the target's check does not see. A difference between two configs no larger
than the one between a config and itself run again is no finding. NOTE: the order is drawn at random for each
prompt, not rotated: in a fixed rotation each config always follows the same one, and what ran just before a config
(the caches it left, the machine's state) moves its speed.

The report is printed and written to ``benchmarks/results/adaptive-<date>-<commit>.md`` with the command and the
machine (``benchmarks/results.py``).

    python benchmarks/adaptive.py --per-category 1 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import transformers
from results import Report  # benchmarks/results.py, beside this script
from scipy import stats

from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.decoding.schedules import History
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.spec import drafter_from_spec
from specert.study.prompts import load_prompts

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
WARM_UP = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SHAPES = {
    "int4": [("k", 3), ("k", 4), ("k", 8), ("k", 12), ("tree", "2,1,1,1,1,1,1"), ("k", "heuristic"),
             ("k", "heuristic:8"), ("k", "auto"), ("tree", "auto:16")],
    "ngram:3": [("k", 2), ("k", 4), ("tree", "3,2,1,1"), ("k", "heuristic"), ("k", "auto"), ("tree", "auto:16")],
    "layerskip:20": [("k", 4), ("k", "auto")],
    "pruned": [("k", 2), ("k", 4), ("tree", "2,1"), ("k", "heuristic"), ("k", "auto"), ("tree", "auto:16")],
    "head": [("k", 1), ("k", 2), ("k", 4), ("tree", "2,1"), ("tree", "3,2,2,1"), ("k", "heuristic"), ("k", "auto"),
             ("tree", "auto:16")],
}
SHAPES.update({f"compiled:{spec}": SHAPES[spec] for spec in ("int4", "pruned")})  # the same drafters, compiled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1, help="run every (prompt, config) this many times, in rounds, "
                    "and keep the fastest (timeit's convention against machine noise)")
    ap.add_argument("--drafter", action="append", choices=sorted(SHAPES), help="drafters to run (default: all)")
    ap.add_argument("--shape", action="append", metavar="k=N|tree=W",
                    help="shapes to run instead of the drafter's default ones (k=8, k=auto, tree=auto:16, ...)")
    ap.add_argument("--again", action="append", metavar="k=N|tree=W", default=[],
                    help="run this shape a second time, as a config of its own with its own history (the noise "
                    "of comparing two of a drafter's configs, as 'target again' is the target's)")
    args = ap.parse_args()
    report = Report("adaptive")  # the load average before the run
    report.versions.update(torch=f"{torch.__version__} ({torch.get_num_threads()} threads)",
                           transformers=transformers.__version__)
    shapes = None
    if args.shape:
        shapes = [_shape(ap, s) for s in args.shape]
    shapes_of = {spec: shapes or SHAPES[spec] for spec in (args.drafter or SHAPES)}
    configs = [(f"{spec} {kind}={value}", spec, {kind: value}) for spec, kinds in shapes_of.items()
               for kind, value in kinds]
    again = [_shape(ap, s) for s in args.again]
    known = {name for name, _, _ in configs}
    for spec in shapes_of:
        if missing := [f"{k}={v}" for k, v in again if f"{spec} {k}={v}" not in known]:
            ap.error(f"--again {', '.join(missing)}: not among {spec}'s shapes; run it with --shape too")
    configs += [(f"{spec} {kind}={value} again", spec, {kind: value}) for spec in shapes_of for kind, value in again]
    target = load_model("smollm2-135m")
    by_cat = defaultdict(list)
    for p in load_prompts(str(SPEC_BENCH)):
        if len(by_cat[p.category]) < args.per_category:
            by_cat[p.category].append(p)
    drafters = {spec: drafter_from_spec(spec, target) for spec in shapes_of}
    histories = defaultdict(History)  # config -> what its certified schedule measured of the drafter

    def run(name, spec, shape, ids, max_new_tokens):
        if spec is not None:
            drafters[spec].history = histories[name]
        return generate(target, ids, drafters.get(spec), max_new_tokens=max_new_tokens, **shape)

    generate(target, encode_prompt(target, "warm up"), max_new_tokens=4)
    for name, spec, shape in configs:  # warm up every config on a prompt that is not measured (a served drafter
        run(name, spec, shape, encode_prompt(target, WARM_UP), 48)  # has a history: certified schedules keep one)
    seconds = defaultdict(float)  # (category, config) -> seconds
    tokens = defaultdict(int)
    runs_of = defaultdict(list)  # (category, config) -> (tokens, seconds) of each prompt's fastest run
    per_prompt = defaultdict(list)  # config -> one SpecDecodeMetrics per prompt, the prompts in the same order
    audit = defaultdict(lambda: defaultdict(int))
    mismatches = 0
    order = random.Random(0)
    for cat, prompts in by_cat.items():
        for p in prompts:
            ids = encode_prompt(target, p.text)
            best = {}  # config -> its fastest generation over the rounds
            for _ in range(args.repeats):
                runs = [("target", None, {}), ("target again", None, {})] + configs
                order.shuffle(runs)  # a config's place in the order, and the config before it, are not its speed
                for name, spec, shape in runs:
                    gen = run(name, spec, shape, ids, args.max_new_tokens)
                    if name not in best or gen.seconds < best[name].seconds:
                        best[name] = gen
                    for key, v in gen.audit.items():  # the audit counts every round
                        audit[name][key] += v
            for name, gen in best.items():
                mismatches += gen.tokens != best["target"].tokens
                seconds[cat, name] += gen.seconds
                tokens[cat, name] += len(gen.tokens)
                runs_of[cat, name].append((len(gen.tokens), gen.seconds))
                if name != "target":
                    per_prompt[name].append(SpecDecodeMetrics())
                    per_prompt[name][-1].observe(gen)
        print(f"done {cat}", flush=True)
    say = report.print
    names = [name for name, _, _ in configs]
    metrics = defaultdict(SpecDecodeMetrics)  # config -> metrics over all prompts
    for name, prompts in per_prompt.items():
        for m in prompts:
            metrics[name].add(dataclasses.asdict(m))
    cats = list(by_cat)

    def num(x):  # a schedule that drafted nothing in the timed runs has no acceptance figures
        return f"{x:.2f}" if math.isfinite(x) else "- (no drafts)"

    def speed(cat, name):
        return tokens[cat, name] / seconds[cat, name] / (tokens[cat, "target"] / seconds[cat, "target"])

    def overall(name):
        t = sum(tokens[c, name] for c in cats) / sum(seconds[c, name] for c in cats)
        return t / (sum(tokens[c, "target"] for c in cats) / sum(seconds[c, "target"] for c in cats))

    say(f"{args.per_category} Spec-Bench prompt(s) per category, {args.max_new_tokens} new tokens, greedy; "
        "tokens/s relative to the target alone in the same run")
    for spec in shapes_of:
        cols = [n for n in names if n.startswith(spec + " ")]
        say(f"\n**{spec}** (target again: the target alone run a second time, the noise of a ratio)\n")
        say("| category | target again | " + " | ".join(c.split(" ", 1)[1] for c in cols) + " |")
        say("|---|---:|" + "---:|" * len(cols))
        for cat in cats:
            say(f"| {cat} | {speed(cat, 'target again'):.2f} | " + " | ".join(f"{speed(cat, c):.2f}" for c in cols)
                + " |")
        say(f"| **all** | {overall('target again'):.2f} | " + " | ".join(f"**{overall(c):.2f}**" for c in cols)
            + " |")
        say("| mean acceptance length | | " + " | ".join(num(metrics[c].mean_acceptance_length) for c in cols)
            + " |")
        for label, count in COUNTS.items():
            say(f"| {label} | | " + " | ".join(num(getattr(metrics[c], count)) for c in cols) + " |")
        fixed = [c for c in cols if not any(w in c for w in ("auto", "heuristic", "again"))]
        best = max(fixed, key=overall)
        for auto in [c for c in cols if "auto" in c and "again" not in c]:
            wins = sum(speed(cat, auto) >= speed(cat, best) for cat in cats)
            near = sum(speed(cat, auto) >= speed(cat, best) * (1 - abs(1 - speed(cat, "target again")))
                       for cat in cats)
            say(f"\n- {auto}: at or above the best fixed shape ({best.split(' ', 1)[1]}) in {wins}/{len(cats)} "
                f"categories, within the target's own run-to-run difference of it in {near}/{len(cats)}; "
                f"guarantee audit {dict(audit[auto])}")
            # against each category's own best fixed shape (picked after the fact: a bound no schedule knows)
            ratios = {cat: speed(cat, auto) / max(speed(cat, c) for c in fixed) for cat in cats}
            noise = {cat: abs(1 - speed(cat, "target again")) for cat in cats}
            say(f"- {auto} / each category's best fixed shape: "
                + ", ".join(f"{cat} {r:.2f}" for cat, r in ratios.items())
                + f"; at or above it in {sum(r >= 1 for r in ratios.values())}/{len(cats)}, within the target's "
                f"run-to-run difference in {sum(r >= 1 - noise[c] for c, r in ratios.items())}/{len(cats)}")
            versus = {cat: interval(runs_of[cat, auto], runs_of[cat, best]) for cat in cats}
            say(f"- {auto} / {best.split(' ', 1)[1]} per category, geometric mean of its prompts' ratios and its "
                "90% t interval: "
                + ", ".join(f"{cat} {r:.2f} [{lo:.2f}, {hi:.2f}]" for cat, (r, lo, hi) in versus.items())
                + f"; above 1 in {sum(lo > 1 for _, lo, _ in versus.values())}/{len(cats)}, holding 1 in "
                f"{sum(lo <= 1 <= hi for _, lo, hi in versus.values())}, below 1 in "
                f"{sum(hi < 1 for _, _, hi in versus.values())}")
            below = holm({cat: (runs_of[cat, auto], runs_of[cat, best]) for cat in cats}, "less")
            say(f"- {auto} below {best.split(' ', 1)[1]} by Holm's procedure over the {len(cats)} categories "
                f"(family-wise 5%): {', '.join(below) or 'none'}")
            r, lo, hi = interval(sum((runs_of[cat, auto] for cat in cats), []),
                                 sum((runs_of[cat, best] for cat in cats), []))
            say(f"- {auto} / {best.split(' ', 1)[1]} over all {sum(len(by_cat[c]) for c in cats)} prompts: "
                f"{r:.3f} [{lo:.3f}, {hi:.3f}]")
            work = {label: count_ratio(per_prompt[auto], per_prompt[best], count) for label, count in COUNTS.items()}
            say(f"- {auto} / {best.split(' ', 1)[1]}, the target's verification work over all prompts (the count's "
                "ratio and its 90% paired bootstrap interval): "
                + ", ".join(f"{label} {r:.3f} [{lo:.3f}, {hi:.3f}]" for label, (r, lo, hi) in work.items())
                + f"; fewer (interval below 1) by {sum(hi < 1 for _, _, hi in work.values())}/{len(work)} counts, "
                f"more (above 1) by {sum(lo > 1 for _, lo, _ in work.values())}")
    say()
    for name in ["target"] + [n for n in names if n.endswith(" again")]:
        original = name.removesuffix(" again")
        pairs = {cat: (runs_of[cat, original + " again"], runs_of[cat, original]) for cat in cats}
        same = {cat: interval(*pair) for cat, pair in pairs.items()}
        r, lo, hi = interval(sum((a for a, _ in pairs.values()), []), sum((b for _, b in pairs.values()), []))
        say(f"- the method on two identical configs, {original} again / {original}: the interval holds 1 in "
            f"{sum(lo <= 1 <= hi for _, lo, hi in same.values())}/{len(cats)} categories (bounds from "
            f"{min(lo for _, lo, _ in same.values()):.2f} to {max(hi for _, _, hi in same.values()):.2f}); apart by "
            "Holm's procedure (family-wise 5% each side): "
            + (", ".join(holm(pairs, "less") + holm(pairs, "greater")) or "none")
            + f"; over all prompts {r:.3f} [{lo:.3f}, {hi:.3f}]")
    say(f"- outputs differing from the target's greedy output: {mismatches}")


def _shape(ap, text: str) -> tuple[str, str]:
    """("k" or "tree", value) from a --shape or --again argument such as k=8 or tree=auto:16."""
    shape = tuple(text.split("=", 1))
    if len(shape) != 2 or shape[0] not in ("k", "tree") or not shape[1]:
        ap.error(f"{text!r}: a shape is k=VALUE or tree=VALUE, e.g. --shape k=8 --shape tree=auto:16")
    return shape


COUNTS = {  # the target's verification work, the table's rows: label -> SpecDecodeMetrics property
    "target tokens / accepted": "target_tokens_per_accepted",
    "target tokens in verifying forwards / accepted": "verifying_tokens_per_accepted",
    "drafted tokens / accepted": "drafted_per_accepted",
    "target tokens / generated token": "target_tokens_per_generated",
}


def count_ratio(mine: list, other: list, count: str, resamples: int = 2000) -> tuple[float, float, float]:
    """``count`` (a :class:`SpecDecodeMetrics` property: a ratio of counts summed over prompts) of ``mine`` over
    that of ``other`` (one SpecDecodeMetrics per prompt, the same prompts in the same order), with its 90% percentile
    bootstrap interval over prompts, paired (a resample draws the same prompts for both; ``scipy.stats.bootstrap``,
    fixed seed; Efron and Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13). Percentile, not BCa: a
    resample whose prompts accepted nothing under one config has an infinite count, which BCa cannot take and the
    percentile interval shows as an unbounded end; under both configs its ratio is undefined, and so is the
    interval (NaN ends: too few prompts, or too few tokens, to tell)."""
    fields = [f.name for f in dataclasses.fields(SpecDecodeMetrics) if isinstance(getattr(mine[0], f.name), int)]
    a = np.array([[getattr(m, f) for f in fields] for m in mine], dtype=np.int64)
    b = np.array([[getattr(m, f) for f in fields] for m in other], dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"count_ratio needs the same prompts for both configs, got {len(a)} and {len(b)}")

    def value(rows):
        rows = np.asarray(rows, dtype=np.int64)
        summed = [SpecDecodeMetrics(**dict(zip(fields, x[rows].sum(0).tolist()))) for x in (a, b)]
        return getattr(summed[0], count) / getattr(summed[1], count)

    rows = np.arange(len(a))
    if len(rows) < 2:
        return value(rows), 0.0, math.inf
    ci = stats.bootstrap((rows,), value, vectorized=False, n_resamples=resamples, confidence_level=0.9,
                         method="percentile", random_state=np.random.default_rng(0)).confidence_interval
    return value(rows), float(ci.low), float(ci.high)


def log_ratios(runs: list, other: list) -> np.ndarray:
    """The log of each prompt's tokens/s of ``runs`` over ``other`` ((tokens, seconds) per prompt, the same prompts
    in the same order)."""
    a, b = np.array(runs, dtype=float), np.array(other, dtype=float)
    return np.log(a[:, 0] / a[:, 1]) - np.log(b[:, 0] / b[:, 1])


def interval(runs: list, other: list) -> tuple[float, float, float]:
    """The geometric mean of the per-prompt ratios of tokens/s of ``runs`` over ``other`` (:func:`log_ratios`) and
    its 90% Student's t interval (the logs of the ratios, n - 1 degrees of freedom; unbounded for one prompt)."""
    logs = log_ratios(runs, other)
    mean = logs.mean()
    if len(logs) < 2:
        return float(np.exp(mean)), 0.0, math.inf
    half = stats.t.ppf(0.95, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def holm(pairs: dict, side: str, alpha: float = 0.05) -> list:
    """The keys of ``pairs`` (key -> (runs, other), as for :func:`log_ratios`) where ``runs`` is slower (``side``
    "less") or faster ("greater") than ``other``, by Holm's step-down procedure at family-wise error ``alpha``:
    one-sided t tests of the log ratios, p-values sorted ascending, the i-th (from 0) a finding while
    p <= alpha / (m - i), m the keys tested (those with 2 prompts or more). Holm, "A simple sequentially rejective
    multiple test procedure", Scand. J. Statist. 6 (1979)."""
    p = {key: stats.ttest_1samp(log_ratios(*runs), 0.0, alternative=side).pvalue
         for key, runs in pairs.items() if len(runs[0]) >= 2}
    found = []
    for i, (key, value) in enumerate(sorted(p.items(), key=lambda item: item[1])):
        if not value <= alpha / (len(p) - i):  # a NaN p-value (identical ratios) is no finding either
            break
        found.append(key)
    return found


if __name__ == "__main__":
    main()
