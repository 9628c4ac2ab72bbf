"""The training objectives of a drafter and the losses of one batch, for a head and for a pruned student.

p is the target's next-token distribution (from the cache, :mod:`specert.train.data`), q the drafter's, C_p the
certificate of the rule the drafter will serve (THEORY.md section 3): a drafted step is *certified* when
KL(p || q) < C_p. The objective per position, averaged over positions::

    kl:         KL(p || q)
    certified:  KL(p || q) + lambda * max(0, KL(p || q) - C_p)
    reachable:  KL(p || q) + lambda * sigmoid(log(KL(p || q) / C_p) / tau),   tau = REACHABLE_TAU = 0.5

The hinge's gradient on an uncertified step is lambda times the KL gradient, whatever the distance to C_p: it
reweights every uncertified step alike, most of which no small head can certify. The ``reachable`` term is a
smooth count of uncertified steps: its gradient, (lambda / tau) s (1 - s) / KL times the KL gradient, peaks on
steps whose KL is within a factor e^tau of C_p and vanishes on steps far above it (or far below).

A head (:func:`head_losses`) computes q on the draft vocabulary S only, with every token outside S sharing one
logit, q(j) = q_rest / (V - |S|) for j not in S; KL(p || q) over the full vocabulary is still exact::

    KL = sum_{i in S} p_i log(p_i / q_i) + sum_{j not in S} p_j log p_j - p_rest log(q_rest / (V - |S|)).

It trains with EAGLE-3's *training-time test* (:func:`unrolled`): it also learns from its own outputs, ``depths``
positions deep, attending as it will when drafting. A pruned student (:func:`student_losses`) drafts from its own
KV cache like the target, so it trains on the texts teacher-forced, over the full vocabulary, at depth 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.nn.functional import log_softmax, relu

from specert.drafters.head import DraftHead
from specert.train.config import DistillConfig

REACHABLE_TAU = 0.5  # width, in log(KL / C_p), of the band the reachable objective works on


def objective(kl: torch.Tensor, cert: torch.Tensor, m: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """The objective ``cfg.objective`` (module docstring) with lambda = ``cfg.hinge``, averaged over the entries
    ``m`` ``[B, T]`` (bool) of the per-entry ``kl`` ``[B, T]`` and C_p ``cert`` ``[B, T]``: a scalar."""
    loss = kl[m].mean()
    if cfg.objective == "certified":
        loss = loss + cfg.hinge * relu(kl - cert)[m].mean()
    elif cfg.objective == "reachable":
        ratio = kl.clamp(min=1e-12).log() - cert.clamp(min=1e-12).log()  # [B, T]: log(KL / C_p)
        loss = loss + cfg.hinge * torch.sigmoid(ratio / REACHABLE_TAU)[m].mean()
    return loss


def depth_mask(t: int, depth: int) -> torch.Tensor:
    """Training-time test attention ``[T, depth * T]`` for pass ``depth`` (1-based): the query at t sees pass 1's
    keys at s <= t - depth + 1 (the real context) and pass j's key at t - depth + j (its own drafted ancestors)."""
    q = torch.arange(t)[:, None]  # [T, 1]
    s = torch.arange(t)[None]  # [1, T]
    blocks = [s <= q - depth + 1] + [s == q - depth + j for j in range(2, depth + 1)]  # depth x [T, T]
    return torch.cat(blocks, 1)


def unrolled(head: DraftHead, feats: torch.Tensor, tokens: torch.Tensor, depths: int) -> Iterator[torch.Tensor]:
    """Training-time test: yield the head's outputs g ``[B, T-1, H]`` for depth 1, 2, ..., ``depths``.

    Depth 1 reads the target's states ``feats`` ``[B, T, nl * H]`` and the next tokens of ``tokens`` ``[B, T]``;
    depth d reads depth d-1's output one position back, and its query at t attends as a drafted token d positions
    deep does at decoding (:func:`depth_mask`).
    """
    t = feats.shape[1] - 1
    positions, nxt = torch.arange(t), tokens[:, 1:]  # [T-1], [B, T-1]
    keys, values, prev = [], [], None
    for d in range(1, depths + 1):
        if d == 1:
            g, k, v = head.run(head.fuse(feats[:, :-1]), nxt, positions)
        else:
            a = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)  # [B, T-1, H]
            g, k, v = head.run(a, nxt, positions, torch.cat(keys, 2), torch.cat(values, 2), depth_mask(t, d))
        keys.append(k)
        values.append(v)
        prev = g
        yield g


def head_losses(head: DraftHead, batch: dict, cfg: DistillConfig) -> dict:
    """The objective and its parts for one batch of :meth:`specert.train.data.Texts.batch`, over ``cfg.depths``
    passes of the training-time test.

    Entry t of a text pairs the target's states at t with token t+1 and predicts token t+2, whose target
    distribution p is the target's at t+1; depth d scores entries t >= d - 1. Returns scalars ``loss`` (the mean
    over depths of the objective) and per depth ``kl/d``, ``agree/d`` (q's top token is the target's greedy one),
    ``certified/d`` and ``count/d`` (entries scored), and the per-entry KL of depth 1 under ``kl_entries``.
    """
    feats = batch["features"].float()  # [B, T, nl * H]
    tokens = batch["tokens"].long()  # [B, T]
    h = head.cfg.hidden
    t = feats.shape[1] - 1  # entries
    with torch.no_grad():  # the target's distribution at t+1 over S, the rest, and -H(p)
        logp_s = feats[:, 1:, -h:] @ head.lm_rows.T - batch["lse"][:, 1:, None]  # [B, t, S]
        p_s = logp_s.exp()  # [B, t, S]
        p_rest = batch["log_rest"][:, 1:].exp()  # [B, t]
        neg_entropy = (p_s * logp_s).sum(-1) + batch["rest_plogp"][:, 1:]  # [B, t]
        cert = batch["certificate"][:, 1:]  # [B, t]
        top1 = batch["top1"][:, 1:].long()  # [B, t]
    valid = batch["valid"][:, 1:]  # [B, t]
    positions = torch.arange(t)
    out, total = {}, 0.0
    for d, g in enumerate(unrolled(head, feats, tokens, cfg.depths), 1):
        logq = log_softmax(head.draft_logits(g), -1)  # [B, t, S + 1]
        cross = -((p_s * logq[..., :-1]).sum(-1) + p_rest * (logq[..., -1] - head.log_others))  # [B, t]
        kl = neg_entropy + cross  # [B, t]
        m = valid & (positions >= d - 1)  # [B, t]
        total = total + objective(kl, cert, m, cfg) / cfg.depths
        with torch.no_grad():
            agree = head.vocab[logq[..., :-1].argmax(-1)] == top1  # [B, t]
            out[f"kl/{d}"] = float(kl[m].mean())
            out[f"agree/{d}"] = float(agree[m].float().mean())
            out[f"certified/{d}"] = float((kl < cert)[m].float().mean())
            out[f"count/{d}"] = int(m.sum())
            if d == 1:
                out["kl_entries"] = kl[m].detach()
    out["loss"] = total
    return out


def student_losses(model: torch.nn.Module, batch: dict, cfg: DistillConfig) -> dict:
    """:func:`head_losses` for a standalone drafter (the pruned student), which reads the same tokens as the
    target: entry t's q is the drafter's next-token distribution after tokens 0..t, over the full vocabulary, and p
    the target's (from its cached float16 final states, as the head's). Depth 1 only (a standalone drafter's deeper
    drafts are the same computation on its own tokens)."""
    tokens, valid = batch["tokens"].long(), batch["valid"]  # [B, T], [B, T]
    lm = model.get_output_embeddings().weight  # [V, H]
    h = lm.shape[1]
    with torch.no_grad():
        logp = batch["features"][..., -h:].float() @ lm.T.float() - batch["lse"][..., None]  # [B, T, V]
        p = logp.exp()  # [B, T, V]
        neg_entropy = (p * logp).sum(-1)  # [B, T]
        top1 = batch["top1"].long()  # [B, T]
    logits = model(input_ids=tokens, attention_mask=valid.long(), use_cache=False).logits  # [B, T, V]
    logq = log_softmax(logits.float(), -1)  # [B, T, V]
    kl = neg_entropy - (p * logq).sum(-1)  # [B, T]
    out = {"loss": objective(kl, batch["certificate"], valid, cfg)}
    with torch.no_grad():
        out["kl/1"] = float(kl[valid].mean())
        out["agree/1"] = float((logq.argmax(-1) == top1)[valid].float().mean())
        out["certified/1"] = float((kl < batch["certificate"])[valid].float().mean())
        out["kl_entries"] = kl[valid].detach()
        out["count/1"] = int(valid.sum())
    return out
