"""specert's own decoder against vLLM on the same machine, model, prompts and greedy decoding.

The embedded SmolLM2-135M in float32 on both sides (vLLM serves the same weights from a Hugging Face folder written
by ``specert.decoding.models.save_hf_folder``), one Spec-Bench prompt per category (first turn, through the chat
template; the same token ids sent to both), batch 1, temperature 0, ``--max-new-tokens`` tokens each with EOS
ignored. Methods:

- vLLM plain, and vLLM with its n-gram speculation (``--speculative-config`` ngram, ``--k`` tokens, lookup
  ``--lookup MIN,MAX``), both without prefix caching: two servers started and stopped by this script
  (``tests/vllm_server.py``: float32, eager, ``VLLM_CPU_KVCACHE_SPACE=1``, Intel OpenMP preloaded, one compute
  thread on 2 cores), timed per request from the client (HTTP included);
- specert plain (``specert.decoding.loop.generate`` without a drafter) and with drafters: ``compiled:int4`` k=auto,
  ``int4`` (its default k=3), ``ngram:3`` (k=4), and ``vllm-ngram:MIN,MAX`` with k=``--k``: vLLM's own proposer in
  specert's decoder (``Generation.seconds``: prefill and decoding).

For every prompt all methods run back to back in an order drawn at random (seeded), ``--repeats`` rounds, each
method's fastest kept (timeit's convention against machine noise). Every speed comes with its ratio to vLLM plain
and to specert plain measured in the same run (geometric mean over prompts of per-prompt ratios). Outputs are compared
token for token with vLLM plain's. Then the engine cross-check (``specert.served.engine.crosscheck``): vLLM's
speculative-decoding counters for the prompts beside specert's replay of vLLM's n-gram proposer on the server's own
greedy texts, which must agree exactly. The report is printed and written to
``benchmarks/results/vllm_compare-<date>-<commit>.md`` (``benchmarks/results.py``).

    python benchmarks/vllm_compare.py
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from results import Report  # benchmarks/results.py, beside this script

import specert
from specert.decoding.loop import generate
from specert.decoding.models import EMBEDDED, encode_prompt, load_model
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.spec import drafter_from_spec
from specert.served.client import ServedModel
from specert.served.engine import NgramConfig, SpecCounts, crosscheck, read_spec_counts
from specert.study.prompts import load_prompts

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
from vllm_server import embedded_hf_folder, start_vllm, stop_vllm  # noqa: E402  (tests/vllm_server.py)

SPEC_BENCH = REPOSITORY.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
WARM_UP = "Write a short story about a lighthouse keeper who finds a message in a bottle."
VLLM_PLAIN, VLLM_NGRAM, SPECERT_PLAIN = "vLLM plain", "vLLM ngram", "specert plain"


def vllm_greedy(http: httpx.Client, url: str, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    """(output ids, seconds from request to reply) of one greedy request, EOS ignored."""
    start = time.perf_counter()
    reply = http.post(url + "/completions", json={"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                                                  "ignore_eos": True, "return_token_ids": True})
    seconds = time.perf_counter() - start
    reply.raise_for_status()
    return [int(t) for t in reply.json()["choices"][0]["token_ids"]], seconds


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two outputs differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=str(SPEC_BENCH))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over every (prompt, method); the fastest kept")
    ap.add_argument("--k", type=int, default=4, help="vLLM's num_speculative_tokens, and specert's vllm-ngram chain")
    ap.add_argument("--lookup", default="2,4", help="vLLM's prompt_lookup_min,prompt_lookup_max")
    ap.add_argument("--seed", type=int, default=0, help="seeds the order of the methods per prompt")
    args = ap.parse_args()
    report = Report("vllm_compare")  # the load average before the run
    low, high = (int(x) for x in args.lookup.split(","))
    ngram = NgramConfig(args.k, low, high)
    specert_configs = {  # label: (drafter spec, shape)
        SPECERT_PLAIN: (None, {}),
        "specert compiled:int4 k=auto": ("compiled:int4", {"k": "auto"}),
        "specert int4 k=3": ("int4", {"k": 3}),
        "specert ngram:3 k=4": ("ngram:3", {"k": 4}),
        f"specert vllm-ngram:{low},{high} k={args.k}": (f"vllm-ngram:{low},{high}", {"k": args.k}),
    }

    target = load_model(EMBEDDED)
    prompts = load_prompts(args.prompts, args.per_category * 13)
    ids = [encode_prompt(target, p.text) for p in prompts]
    warm = encode_prompt(target, WARM_UP)
    folder = embedded_hf_folder()
    print(f"starting two vLLM servers on {folder} ...", flush=True)
    # NOTE: no prefix caching: specert caches no prompt between requests, and a prompt served from vLLM's prefix
    # cache may count one draft more than the proposer makes (specert.served.engine's docstring)
    no_cache = ["--no-enable-prefix-caching"]
    with ThreadPoolExecutor(2) as pool:  # both at once: most of a start is imports, one process after another
        starts = [pool.submit(start_vllm, folder, no_cache + extra) for extra in
                  ([], ["--speculative-config", ngram.speculative_config()])]
        servers = [s.result() for s in starts]
    (plain_url, plain_pid), (ngram_url, ngram_pid) = servers
    try:
        http = httpx.Client(timeout=600)
        vllm_version = http.get(plain_url.removesuffix("/v1") + "/version").json().get("version", "?")
        drafters = {label: drafter_from_spec(spec, target) if spec else None
                    for label, (spec, _) in specert_configs.items()}

        def run(label: str, prompt: list[int]):
            """(tokens, seconds, generation or None) of one method on one prompt."""
            if label in (VLLM_PLAIN, VLLM_NGRAM):
                tokens, seconds = vllm_greedy(http, plain_url if label == VLLM_PLAIN else ngram_url, prompt,
                                              args.max_new_tokens)
                return tokens, seconds, None
            _, shape = specert_configs[label]
            gen = generate(target, prompt, drafters[label], max_new_tokens=args.max_new_tokens, stop_at_eos=False,
                           **shape)
            return gen.tokens, gen.seconds, gen

        labels = [VLLM_PLAIN, VLLM_NGRAM, *specert_configs]
        print("warming up (a torch.compile of the compiled drafter included) ...", flush=True)
        for label in labels:  # first calls, on a prompt that is not measured
            run(label, warm)
        ngram_server = ServedModel(ngram_url)
        ngram_server.check()
        counters_before = read_spec_counts(ngram_server.metrics())
        rng = random.Random(args.seed)
        best: dict[tuple[int, str], float] = {}
        outputs: dict[tuple[int, str], list[int]] = {}
        metrics = {label: SpecDecodeMetrics() for label in specert_configs}
        loads = []
        for round_ in range(args.repeats):
            for i, prompt in enumerate(ids):
                order = labels[:]
                rng.shuffle(order)
                for label in order:
                    tokens, seconds, gen = run(label, prompt)
                    best[i, label] = min(best.get((i, label), math.inf), seconds)
                    outputs.setdefault((i, label), tokens)
                    if gen is not None and round_ == 0:
                        metrics[label].observe(gen)
                loads.append(os.getloadavg()[0])
                print(f"round {round_ + 1}/{args.repeats}, prompt {i + 1}/{len(ids)} ({prompts[i].category}), "
                      f"load {loads[-1]:.1f}", flush=True)
        engine_timed = read_spec_counts(ngram_server.metrics()) - counters_before
        print("engine cross-check ...", flush=True)
        check = crosscheck(ngram_server, ids, args.max_new_tokens, ngram)
    finally:
        for pid in (plain_pid, ngram_pid):
            stop_vllm(pid)

    say = report.print
    say(f"specert {specert.__version__}, vLLM {vllm_version} (vllm-cpu), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads in specert's process; vLLM's worker: 1 compute thread "
        "(VLLM_CPU_OMP_THREADS_BIND auto, the other core for its front end)")
    say(f"{len(ids)} Spec-Bench prompts ({args.per_category} per category), {args.max_new_tokens} new tokens "
        f"(EOS ignored), greedy, batch 1, fastest of {args.repeats} round(s); vLLM ngram: {ngram.speculative_config()}")
    say(f"load average (1 min) during the timed rounds: {min(loads):.1f} to {max(loads):.1f} on "
        f"{os.cpu_count()} cores")
    say()
    say("**Speed** (tokens/s: all prompts' tokens over their time; ratios: geometric mean over prompts of each "
        "prompt's ratio, same run)")
    say()
    rows = []
    reference = {i: outputs[i, VLLM_PLAIN] for i in range(len(ids))}
    for label in labels:
        tokens = sum(len(outputs[i, label]) for i in range(len(ids)))
        seconds = sum(best[i, label] for i in range(len(ids)))
        speed = {i: len(outputs[i, label]) / best[i, label] for i in range(len(ids))}
        ratio = {base: geometric_mean([speed[i] / (len(outputs[i, base]) / best[i, base]) for i in range(len(ids))])
                 for base in (VLLM_PLAIN, SPECERT_PLAIN)}
        same = sum(outputs[i, label] == reference[i] for i in range(len(ids)))
        if label in metrics:
            mal = f"{metrics[label].mean_acceptance_length:.2f}" if label != SPECERT_PLAIN else ""
        else:
            mal = f"{engine_timed.mean_acceptance_length:.2f}" if label == VLLM_NGRAM else ""
        rows.append([label, f"{tokens / seconds:.1f}", f"{ratio[VLLM_PLAIN]:.2f}", f"{ratio[SPECERT_PLAIN]:.2f}",
                     f"{same}/{len(ids)}", mal])
    table(say, ["method", "tokens/s", "x vLLM plain", "x specert plain", "output = vLLM plain's",
                "mean acceptance length"], rows)
    say()
    say("**Per category** (tokens/s)")
    say()
    table(say, ["category", *labels], [[prompts[i].category, *(f"{len(outputs[i, m]) / best[i, m]:.1f}"
                                                                 for m in labels)] for i in range(len(ids))])
    say()
    differing = {label: [(prompts[i].category, first_difference(outputs[i, label], reference[i]))
                         for i in range(len(ids)) if outputs[i, label] != reference[i]] for label in labels}
    for label, where in differing.items():
        if where:
            say(f"- {label}: output differs from vLLM plain's on {len(where)} prompt(s), first at token "
                + ", ".join(f"{at} ({cat})" for cat, at in where))
    if not any(differing.values()):
        say(f"- every output is vLLM plain's, token for token ({len(ids)} prompts x {len(labels)} methods)")
    say()
    say(f"**Engine cross-check** (vLLM's counters over the {len(ids)} prompts, {args.max_new_tokens} tokens each; "
        "specert's replay of vLLM's n-gram proposer on the server's greedy texts)")
    say()
    spec_label = f"specert vllm-ngram:{low},{high} k={args.k}"
    ours = metrics[spec_label]
    decoder = SpecCounts(ours.num_drafts, ours.num_draft_tokens, ours.num_accepted_tokens,
                         list(ours.accepted_per_position))

    def cells(c: SpecCounts) -> list:
        return [c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, c.accepted_per_position,
                f"{c.mean_acceptance_length:.3f}", ", ".join(f"{r:.3f}" for r in c.acceptance_rate_per_position)]

    columns = ["counts", "drafts", "draft tokens", "accepted", "accepted per position", "mean acceptance length",
               "per-position rate"]
    table(say, columns, [["vLLM counters", *cells(check.engine)], ["specert replay", *cells(check.replay)],
                         [f"specert's decoder, {spec_label}", *cells(decoder)]])
    say()
    agree = check.engine.same_as(check.replay)
    say(f"- counters and replay agree exactly: {'yes' if agree else 'NO'}")
    say("- specert's decoder runs the same proposer on the same greedy texts but drafts no further than the tokens "
        "it still has to generate (vLLM drafts k tokens to the last step and counts acceptances past max_tokens), "
        "hence its fewer draft tokens at the ends of the generations")
    report.write()


def table(say, columns: list[str], rows: list[list]) -> None:
    say("| " + " | ".join(columns) + " |")
    say("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        say("| " + " | ".join(str(cell) for cell in row) + " |")


if __name__ == "__main__":
    main()
