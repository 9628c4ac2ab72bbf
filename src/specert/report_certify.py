"""Per-step records of certificates, margins and bounds for `specert certify`."""

from __future__ import annotations

import torch

from specert.acceptance import accepts
from specert.bounds import margin, margin_bounds
from specert.certificates import certificate, drafter_certificate
from specert.divergence import kl
from specert.rules import Rule


def certify_records(target: torch.Tensor, rules: list[Rule], draft: torch.Tensor | None = None) -> list[dict]:
    """One record per (step, rule); steps are the flattened leading dimensions of ``target [..., V]``."""
    target = target.reshape(-1, target.shape[-1])
    if draft is not None:
        draft = draft.reshape(-1, draft.shape[-1])
        divergence, d_q = kl(target, draft), drafter_certificate(draft, 1)
    records = []
    per_rule = {}
    for r in rules:
        lower, upper = margin_bounds(target, r)
        per_rule[r.spec] = (certificate(target, r), margin(target, r), lower, upper,
                            accepts(target, draft, r) if draft is not None else None)
    for step in range(target.shape[0]):
        for r in rules:
            c, g, lo, up, ok = per_rule[r.spec]
            rec = {"step": step, "rule": r.spec, "certificate": float(c[step]), "margin": float(g[step]),
                   "lower": float(lo[step]), "upper": float(up[step])}
            if draft is not None:
                rec.update(kl=float(divergence[step]), **{"D_q(1)": float(d_q[step])},
                           certified=bool(divergence[step] < c[step]), accepted=bool(ok[step]))
            records.append(rec)
    return records
