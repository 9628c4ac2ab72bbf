"""Whether a rule accepts a draft, with ties counted against acceptance (THEORY.md section 2)."""

from __future__ import annotations

import torch

from specert.theory.rules import Rule, TopM, Tree
from specert.theory.rules import rule as as_rule
from specert.theory.stats import TargetStats
from specert.theory.tensors import as_logits, broadcast, map_blocks


def _accepts_block(target: torch.Tensor, draft: torch.Tensor, r: Rule) -> torch.Tensor:
    if isinstance(r, Tree):
        # The target greedy token (worst of ties: the one the drafter ranks lowest) must have fewer than m
        # tokens at or above it in the drafter's order.
        x0 = target == target.amax(-1, keepdim=True)  # [n, V]
        q_x0 = torch.where(x0, draft, float("inf")).amin(-1, keepdim=True)  # [n, 1]
        return (draft >= q_x0).sum(-1) - 1 < r.m
    # Single candidate: every drafter greedy token (ties) must clear the rule; the least probable one decides.
    x_d = draft == draft.amax(-1, keepdim=True)  # [n, V]
    worst = torch.where(x_d, target, float("inf")).amin(-1)  # [n] target logit of the worst greedy token
    return worst > r.reject_level(TargetStats.of(target, entropy=r.needs_entropy))


def accepts(target_logits, draft_logits, rule):
    """Whether ``rule`` accepts the drafter's greedy token(s) at each step.

    Single-candidate rules judge the drafter's greedy token x_d = argmax q; where q ties for its argmax, the draft
    is accepted only if every tied token is accepted. ``tree:m`` accepts iff the target's greedy token is among the
    drafter's top-m tokens under every tie-breaking. A token the target masks (p = 0) is always rejected.

    Args:
        target_logits: ``[..., V]`` target logits (torch or numpy, any float dtype).
        draft_logits: ``[..., V]`` drafter logits, broadcastable with the target's.
        rule: a spec string or a :class:`~specert.theory.rules.Rule`.
    Returns:
        bool ``[...]`` in the target's library.
    """
    r = as_rule(rule)
    target, draft = broadcast(as_logits(target_logits, "target_logits"), as_logits(draft_logits, "draft_logits"))
    r.validate(target.vocab_size)
    # Each side stays in its own compute dtype: the target's decides exactly as `certificate` does.
    return target.output(map_blocks(lambda t, d: _accepts_block(t, d, r), target.values, draft.values))


def tokens_accepted(target_logits: torch.Tensor, tokens: torch.Tensor, rule) -> torch.Tensor:
    """Whether ``rule`` accepts each drafted token, judged on the token alone (the decoder's verifier).

    Args:
        target_logits: ``[N, V]`` target logits at the drafted positions (torch).
        tokens: ``[N]`` int64 drafted tokens.
        rule: a single-candidate rule or ``tree:m``; a tree rule verifies like strict greedy (a node's child survives
            iff it is the target's greedy token), m being only the width its certificate assumes.
    Returns:
        bool ``[N]``.
    """
    r = as_rule(rule)
    if isinstance(r, Tree):
        r = TopM(1)
    logits = as_logits(target_logits, "target_logits").values
    drafted = logits.gather(-1, tokens.reshape(-1, 1))[:, 0]
    if isinstance(r, TopM):  # NOTE: the decoder's hot path: top-m needs the (m+1)-th logit alone, no other pass
        return drafted > torch.topk(logits, r.m + 1, -1).values[:, r.m]
    return drafted > r.reject_level(TargetStats.of(logits, entropy=r.needs_entropy))
