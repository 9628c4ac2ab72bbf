"""Speed of specert's speculative decoding against plain greedy decoding and transformers' assisted generation.

Greedy, batch 1, on Spec-Bench prompts (first turn), per category. For every prompt all methods run back to back
(interleaved, so that machine noise hits them alike); tokens/s are reported as ratios to plain greedy decoding
with transformers' ``generate`` measured in the same run. Every greedy method must produce the same text; the
script checks it.

    python benchmarks/speed.py --per-category 2 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from specert.decoding import generate
from specert.drafters import drafter_from_spec
from specert.models import encode_prompt, load_model
from specert.prompts import load_prompts

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
    ap.add_argument("--k", type=int, default=4, help="draft length of specert and transformers alike")
    ap.add_argument("--layerskip", type=int, default=4, help="early-exit layer of the layer-skip drafter")
    ap.add_argument("--ngram", type=int, default=3)
    args = ap.parse_args()

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
    _spec.drafters = drafters
    rates = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))  # category -> method -> [tokens, seconds]
    mal = defaultdict(list)
    mismatches = 0
    for cat, ps in by_cat.items():
        for p in ps:
            ids = encode_prompt(target, p.text)
            ref = None
            for name, fn in methods.items():
                start = time.perf_counter()
                tokens, acc_len = fn(ids)
                seconds = time.perf_counter() - start
                rates[cat][name][0] += len(tokens)
                rates[cat][name][1] += seconds
                if acc_len is not None:
                    mal[name].append(acc_len)
                ref = tokens if ref is None else ref
                n = min(len(ref), len(tokens))
                mismatches += tokens[:n] != ref[:n]
        print(f"done {cat}", flush=True)
    names = list(methods)
    print(f"\ntarget {args.target}, {args.per_category} prompts per category, {args.max_new_tokens} new tokens, "
          f"k={args.k}, {torch.get_num_threads()} threads; tokens/s relative to 'hf greedy' in the same run")
    print("| category | hf greedy tok/s | " + " | ".join(names[1:]) + " |")
    print("|---|---:|" + "---:|" * (len(names) - 1))
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
        print(f"| {cat} | {base:.1f} | " + " | ".join(cells) + " |")
    base = totals["hf greedy"][0] / totals["hf greedy"][1]
    print(f"| **all** | {base:.1f} | " + " | ".join(f"{totals[n][0] / totals[n][1] / base:.2f}x" for n in names[1:])
          + " |")
    for name, values in mal.items():
        print(f"{name}: mean acceptance length {sum(values) / len(values):.2f}")
    print(f"outputs differing from hf greedy: {mismatches}")


def _spec(target, ids, spec, args):
    gen = generate(target, ids, _spec.drafters[spec], "greedy", k=args.k, max_new_tokens=args.max_new_tokens)
    drafts = [a for a, d in zip(gen.accepted, gen.drafted) if d]
    return gen.tokens, 1 + sum(drafts) / len(drafts) if drafts else 1.0


if __name__ == "__main__":
    main()
