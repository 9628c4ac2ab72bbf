"""`specert bench`: time every rule's certificate against torch.logsumexp on the same logits, in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from specert.theory.certificates import certificate, certificates, drafter_certificate
from specert.theory.rules import STANDARD_RULES


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_bench(batch: int = 512, vocab: int = 151936, repeat: int = 3, seed: int = 0, rules=STANDARD_RULES):
    """Rows of (name, seconds, ratio to logsumexp) on ``[batch, vocab]`` random float32 logits (scale 3)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    base = _time(lambda: torch.logsumexp(logits, -1), repeat)
    rows = [("torch.logsumexp", base, 1.0)]
    rows.append(("torch.topk(k=16)", _time(lambda: torch.topk(logits, 16, -1), repeat), None))
    for spec in rules:
        rows.append((spec, _time(lambda s=spec: certificate(logits, s), repeat), None))
    rows.append(("drafter_certificate(m=1)", _time(lambda: drafter_certificate(logits, 1), repeat), None))
    rows.append(("all rules together", _time(lambda: certificates(logits, rules), repeat), None))
    return [(name, sec, sec / base) for name, sec, _ in rows]
