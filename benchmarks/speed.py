"""Speed of specert's speculative decoding against plain greedy decoding and transformers' assisted generation.

Greedy, batch 1, on Spec-Bench prompts (first turn), per category. For every prompt all methods run back to back
(interleaved, so that machine noise hits them alike; with ``--repeats R``, R such rounds and each method's fastest
kept); tokens/s are reported as ratios to plain greedy decoding with transformers' ``generate`` measured in the same
run. Every greedy method must produce the same text; the script checks it. The report is printed and written to
``benchmarks/results/speed-<date>-<commit>.md`` with the command and the machine (``benchmarks/results.py``).

    python benchmarks/speed.py --per-category 2 --max-new-tokens 64

Model drafters (``--model-drafter``, default ``int4`` for the embedded target: the target with 4-bit weights; also
``int8``, ``pruned[:FILE]``, ``model:SPEC`` or ``compiled:SPEC``, their step compiled) run in
specert as a chain of ``--model-k`` tokens and in transformers as ``assistant_model`` with its default schedule
(up to 20 tokens, stopping early below a confidence of 0.4).

Draft heads (``specert distill``) have no transformers counterpart; ``--head SPEC`` (repeatable; default the head
shipped for the embedded model) adds them, with the share of traced positions whose KL(p || q) was below the strict
greedy certificate (certified, hence accepted).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from results import Report  # benchmarks/results.py, beside this script

from specert.decoding.forward import forward_features, keep_cache, new_cache
from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.decoding.schedules import FixedSchedule
from specert.drafters.spec import drafter_from_spec
from specert.study.prompts import load_prompts

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def hf_generate(model, ids, max_new_tokens, **assist):
    """transformers' own greedy generation (assisted when ``assist`` names a drafter); returns new tokens."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             **assist)
    return out[0, len(ids):].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--prompts", default=str(SPEC_BENCH))
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="time every (prompt, method) this many times, in rounds "
                    "over all methods, and keep the fastest (timeit's convention against machine noise)")
    ap.add_argument("--k", type=int, default=4, help="draft length of specert and transformers alike")
    ap.add_argument("--layerskip", type=int, default=4, help="early-exit layer of the layer-skip drafter")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--model-drafter", action="append",
                    help="model drafter spec (repeatable): int4, int8 or model:SPEC; default int4 (embedded target)")
    ap.add_argument("--model-k", type=int, default=8, help="specert's chain length with model drafters")
    ap.add_argument("--head", action="append",
                    help="draft head spec (repeatable), e.g. head or head:FILE; none for no head")
    ap.add_argument("--model-shape", action="append", default=[],
                    help="also run each model drafter with this shape (repeatable), e.g. k=auto:16")
    ap.add_argument("--no-free-drafters", action="store_true", help="leave out ngram and layerskip (and their "
                    "transformers counterparts)")
    ap.add_argument("--head-shape", action="append", default=[],
                    help="also run each head with this shape (repeatable), e.g. k=3 or tree=2,1")
    args = ap.parse_args()
    report = Report("speed")  # the load average before the run
    report.versions.update(torch=f"{torch.__version__} ({torch.get_num_threads()} threads)",
                           transformers=transformers.__version__)
    embedded = args.target == "smollm2-135m"
    heads = args.head if args.head is not None else (["head"] if embedded else [])
    heads = [h for h in heads if h != "none"]
    model_drafters = args.model_drafter if args.model_drafter is not None else (["int4"] if embedded else [])

    target = load_model(args.target)
    model = target.model
    prompts = load_prompts(args.prompts)
    by_cat = defaultdict(list)
    for p in prompts:
        if len(by_cat[p.category]) < args.per_category:
            by_cat[p.category].append(p)
    ngram, skip = f"ngram:{args.ngram}", f"layerskip:{args.layerskip}"
    methods = {
        "hf greedy": lambda ids: (hf_generate(model, ids, args.max_new_tokens), None),
        "specert greedy": lambda ids: (generate(target, ids, None, max_new_tokens=args.max_new_tokens).tokens, None),
        f"specert {ngram}": lambda ids: _spec(target, ids, ngram, args),
        f"hf prompt lookup {args.ngram}": lambda ids: (hf_generate(
            model, ids, args.max_new_tokens, prompt_lookup_num_tokens=args.k, max_matching_ngram_size=args.ngram),
            None),
        f"specert {skip}": lambda ids: _spec(target, ids, skip, args),
        f"hf early exit {args.layerskip}": lambda ids: (hf_generate(
            model, ids, args.max_new_tokens, assistant_early_exit=args.layerskip), None),
    }
    drafters = {ngram: drafter_from_spec(ngram, target), skip: drafter_from_spec(skip, target)}
    for spec in model_drafters:
        drafters[spec] = drafter_from_spec(spec, target)
        methods[f"specert {spec} k={args.model_k}"] = lambda ids, spec=spec: _spec(
            target, ids, spec, args, {"k": args.model_k})
        methods[f"hf assisted {spec}"] = lambda ids, spec=spec: (hf_generate(
            model, ids, args.max_new_tokens, assistant_model=drafters[spec].model), None)
        for shape in args.model_shape:
            kind, _, value = shape.partition("=")
            methods[f"specert {spec} {shape}"] = lambda ids, spec=spec, kind=kind, value=value: _spec(
                target, ids, spec, args, {kind: int(value) if value.isdigit() else value})
    if args.no_free_drafters:
        free = (ngram, skip, f"prompt lookup {args.ngram}", f"early exit {args.layerskip}")
        methods = {name: fn for name, fn in methods.items() if not name.endswith(free)}
        del drafters[ngram], drafters[skip]
    for spec in heads:
        drafters[spec] = drafter_from_spec(spec, target)
        methods[f"specert {spec}"] = lambda ids, spec=spec: _spec(target, ids, spec, args)
        for shape in args.head_shape:
            kind, _, value = shape.partition("=")
            methods[f"specert {spec} {shape}"] = lambda ids, spec=spec, kind=kind, value=value: _spec(
                target, ids, spec, args, {kind: int(value) if value.isdigit() else value})
    _spec.drafters = drafters
    warm = encode_prompt(target, "warm up")
    for fn in methods.values():  # first calls (allocations, lazy initialisation) on a prompt that is not measured
        fn(warm)
    rates = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))  # category -> method -> [tokens, seconds]
    mal = defaultdict(list)
    counts = defaultdict(lambda: defaultdict(int))  # method -> accepted, drafted, traced, certified
    mismatches = 0
    for cat, ps in by_cat.items():
        for p in ps:
            ids = encode_prompt(target, p.text)
            ref, best = None, {}
            for _ in range(args.repeats):  # rounds over all methods; each keeps its fastest round
                for name, fn in methods.items():
                    start = time.perf_counter()
                    tokens, stats = fn(ids)
                    seconds = time.perf_counter() - start - (stats or {}).get("trace_seconds", 0.0)
                    if name not in best or seconds < best[name][1]:
                        best[name] = (tokens, seconds, stats)
            for name, (tokens, seconds, stats) in best.items():
                rates[cat][name][0] += len(tokens)
                rates[cat][name][1] += seconds
                if stats is not None:
                    mal[name].append(stats["mal"])
                    for key in ("accepted", "drafted", "traced", "certified"):
                        counts[name][key] += stats[key]
                ref = tokens if ref is None else ref
                n = min(len(ref), len(tokens))
                mismatches += tokens[:n] != ref[:n]
        print(f"done {cat}", flush=True)
    names = list(methods)
    say = report.print
    say(f"target {args.target}, {args.per_category} prompts per category, {args.max_new_tokens} new tokens, "
        f"fastest of {args.repeats} round(s), k={args.k}, {torch.get_num_threads()} threads; tokens/s relative to "
        "'hf greedy' in the same run")
    say()
    say("| category | hf greedy tok/s | " + " | ".join(names[1:]) + " |")
    say("|---|---:|" + "---:|" * (len(names) - 1))
    totals = defaultdict(lambda: [0, 0.0])
    for cat in by_cat:
        base = rates[cat]["hf greedy"][0] / rates[cat]["hf greedy"][1]
        cells = []
        for name in names[1:]:
            t, s = rates[cat][name]
            cells.append(f"{t / s / base:.2f}x")
        for name in names:
            totals[name][0] += rates[cat][name][0]
            totals[name][1] += rates[cat][name][1]
        say(f"| {cat} | {base:.1f} | " + " | ".join(cells) + " |")
    base = totals["hf greedy"][0] / totals["hf greedy"][1]
    say(f"| **all** | {base:.1f} | " + " | ".join(f"{totals[n][0] / totals[n][1] / base:.2f}x" for n in names[1:])
        + " |")
    say()
    for name, values in mal.items():
        c = counts[name]
        line = (f"{name}: mean acceptance length {sum(values) / len(values):.2f}, "
                f"draft acceptance rate {c['accepted'] / max(1, c['drafted']):.1%}")
        if c["traced"]:
            line += f", certified positions {c['certified'] / c['traced']:.1%}"
        say(f"- {line}")
    say(f"- outputs differing from hf greedy: {mismatches}")
    ids = encode_prompt(target, next(iter(by_cat.values()))[0].text)
    rel = forward_times(target, ids)
    say("- target forward of n tokens relative to 1 token: " + ", ".join(f"{n}: {r:.2f}" for n, r in rel.items()))
    for spec, drafter in drafters.items():
        k = args.model_k if spec in model_drafters else args.k
        say(f"- cost of one drafted token relative to one target forward, {spec} (chain of {k}): "
            f"{drafter_cost(target, drafter, ids, k):.3f}")
    report.write()

def forward_times(target, ids, sizes=(1, 2, 3, 4, 5, 6, 8, 12, 16), repeats: int = 7) -> dict:
    """Median time of one target forward of n tokens after the same context, relative to n = 1 (same run)."""
    cache = new_cache(target.model)
    forward_features(target.model, cache, ids[:-1], (), last_only=True)
    times = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:  # interleaved, so that noise hits every size alike
            start = time.perf_counter()
            forward_features(target.model, cache, [ids[-1]] * n, ())
            times[n].append(time.perf_counter() - start)
            keep_cache(cache, len(ids) - 1, [])
    one = float(torch.tensor(times[1]).median())
    return {n: float(torch.tensor(t).median()) / one for n, t in times.items()}


def drafter_cost(target, drafter, ids, k: int = 4, repeats: int = 15) -> float:
    """Median time of one drafted token (a chain of k, divided by k) over the median time of one target forward of
    one token after the same context, timed alternately in the same run."""
    cache = new_cache(target.model)
    _, states = forward_features(target.model, cache, ids[:-1], drafter.feature_layers, last_only=True)
    drafter.target_ran(0, states)
    times = {"target": [], "draft": []}
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            forward_features(target.model, cache, [ids[-1]], ())
            times["target"].append(time.perf_counter() - start)
            keep_cache(cache, len(ids) - 1, [])
            start = time.perf_counter()
            drafter.propose(ids, FixedSchedule([1] * k))
            times["draft"].append((time.perf_counter() - start) / k)
    return float(torch.tensor(times["draft"]).median() / torch.tensor(times["target"]).median())


def _spec(target, ids, spec, args, shape=None):
    """specert with a drafter: (tokens, stats). Heads are traced (certificates); the tracing time is reported apart
    and left out of the speed."""
    shape = shape or {"k": args.k}
    traced = spec.startswith("head")
    start = time.perf_counter()
    gen = generate(target, ids, _spec.drafters[spec], "greedy", max_new_tokens=args.max_new_tokens, trace=traced,
                   **shape)
    total = time.perf_counter() - start
    drafts = [a for a, d in zip(gen.accepted, gen.drafted) if d]
    rows = gen.trace
    return gen.tokens, {"mal": 1 + sum(drafts) / len(drafts) if drafts else 1.0, "accepted": sum(gen.accepted),
                        "drafted": sum(d for d in gen.drafted), "traced": len(rows),
                        "certified": sum(r.kl < r.certificate for r in rows),
                        "trace_seconds": total - gen.seconds}


if __name__ == "__main__":
    main()
