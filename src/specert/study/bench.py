"""`specert bench`: what certificates cost, as ratios to ``torch.logsumexp`` on the same logits in the same run.

``torch.logsumexp`` over ``[N, V]`` is one read of the logits, the floor for anything that needs the normaliser;
every rule's certificate needs it and a few top tokens (THEORY.md section 3), so the ratio says how close a rule
comes to one pass. Three kinds of logits, since a rule's work depends on their shape:

- ``normal``: standard-normal logits (flat rows: the water-filled group runs deep);
- ``lm``: standard-normal x 3, spread like a language model's;
- ``model``: the embedded model's own logits at every position of a few ShareGPT prompts, rows tiled to the batch;
  a vocabulary larger than the model's is filled with further copies of each row lowered by 10 nats (the top of
  each row stays the model's), a smaller one keeps the most probable tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from specert.theory.certificates import certificate, certificates, drafter_certificate
from specert.theory.rules import STANDARD_RULES

KINDS = ("normal", "lm", "model")


def _paired(fn: Callable[[], object], base: Callable[[], object], repeat: int) -> tuple[float, float]:
    """``fn`` against ``base`` side by side: after one warm-up call of each, ``repeat`` rounds that time one call
    of each in turn. Returns (median seconds of ``fn``, median over rounds of its time over ``base``'s), so that
    a machine whose speed drifts between rounds moves both of a round's calls alike."""
    fn()
    base()
    seconds, ratios = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        base()
        middle = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - middle)
        ratios.append(seconds[-1] / (middle - start))
    return statistics.median(seconds), statistics.median(ratios)


def model_rows(prompts: int = 6) -> torch.Tensor:
    """The embedded model's logits ``[R, 49152]`` (float32) at every position of ``prompts`` ShareGPT prompts."""
    from specert.decoding.forward import forward, new_cache
    from specert.decoding.models import EMBEDDED, encode_prompt, load_model
    from specert.study.prompts import load_prompts

    loaded = load_model(EMBEDDED)
    rows = []
    with torch.inference_mode():
        for p in load_prompts(count=prompts):
            ids = encode_prompt(loaded, p.text)[:256]
            rows.append(forward(loaded.model, new_cache(loaded.model), ids).float())  # [T, V]
    return torch.cat(rows)


def bench_logits(kind: str, batch: int, vocab: int, seed: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, vocab]`` float32 logits of one kind (see the module's docstring); ``rows``: :func:`model_rows`."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(batch, vocab, generator=gen)
    if kind == "lm":
        return torch.randn(batch, vocab, generator=gen) * 3
    if kind != "model":
        raise ValueError(f"unknown kind of logits {kind!r}: one of {', '.join(KINDS)}")
    if rows is None:
        rows = model_rows()
    picked = rows[torch.randint(len(rows), (batch,), generator=gen)]  # [batch, V0]
    if vocab < picked.shape[-1]:
        return picked.topk(vocab, -1).values.contiguous()
    copies = -(-vocab // picked.shape[-1])
    return torch.cat([picked - 10.0 * c for c in range(copies)], -1)[:, :vocab].contiguous()  # [batch, vocab]


def run_bench(logits: torch.Tensor, repeat: int = 3, rules=STANDARD_RULES) -> list[tuple[str, float, float]]:
    """Rows of (what, seconds, ratio to logsumexp) on ``logits``: each rule alone, the set in one call, the
    drafter certificate, and ``torch.topk`` for scale; each timed in turn with logsumexp (:func:`_paired`)."""
    base = lambda: torch.logsumexp(logits, -1)  # noqa: E731
    cases = [("torch.logsumexp", base), ("torch.topk(k=16)", lambda: torch.topk(logits, 16, -1))]
    cases += [(spec, lambda s=spec: certificate(logits, s)) for spec in rules]
    cases.append(("drafter_certificate(m=1)", lambda: drafter_certificate(logits, 1)))
    cases.append((f"all {len(rules)} rules in one call", lambda: certificates(logits, rules)))
    return [(name, *_paired(fn, base, repeat)) for name, fn in cases]
