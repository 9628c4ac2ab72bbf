"""Draft shapes: how many candidates each drafted position gets, fixed or decided per step.

A schedule is asked, depth by depth while the drafter builds its tree, for the width of every position of the
frontier given the drafter's logits there; it then observes each verified step.

=====================  ====================================================================================
spec (``k`` / ``tree``)  schedule
=====================  ====================================================================================
``k=4``                a chain of 4 tokens
``tree=4,2,1``         a tree, width 4 at depth 0, 2 at depth 1, 1 at depth 2
``k=auto[:K]``         certified chain: keep drafting while D_q(1) > eps_hat, at most K (8) tokens
``tree=auto[:B]``      certified tree: each position gets the smallest m <= 8 with D_q(m) > eps_hat, at most B
                       (16) nodes, depth <= 8; a position whose m no longer fits the budget gets no children
``k=heuristic[:K]``    transformers' heuristic: start at K (5); +2 after a fully accepted step, -1 otherwise
=====================  ====================================================================================

The certified schedules use the drafter-side certificate D_q(m) (THEORY.md section 7): if the target is within
KL eps of the drafter and D_q(m) > eps, the drafter's top-m holds the target's greedy token. eps_hat is an online
estimate of the drafter's KL(p || q): the ``quantile`` (0.9) of the KLs measured at the verified positions of the
same generation so far (0 before the first, so the first step drafts in full). Positions where D_q(1) already
falls below eps_hat end the chain, and after a step that drafted nothing the drafter is not run for 1, 2, 4, ...
32 steps (plain decoding) before it is probed again: a drafter far from the target drafts little and costs little.

The guarantee audit counts, at verified positions: ``held`` (KL <= the eps_hat the width was chosen with),
``held_covered`` (of those, the target's greedy token was among the candidates: must equal ``held``) and
``exceeded`` (KL > eps_hat: the estimate was wrong there).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from specert.certificates import drafter_certificate
from specert.divergence import kl


class Schedule:
    max_depth: int = 1
    budget: int = 10**9  # most nodes per tree

    @property
    def max_nodes(self) -> int:
        """The most nodes a tree of this schedule can have (it must fit the target's context)."""
        return self.budget

    def widths(self, depth: int, logits: torch.Tensor | None, frontier: int, budget_left: int) -> list[int]:
        """Widths of the ``frontier`` positions at ``depth``; ``logits [frontier, V]`` are the drafter's there
        (None for drafters without a distribution)."""
        raise NotImplementedError

    def observe(self, tree, target_logits: torch.Tensor, path: list[int]) -> None:
        """Learn from a verified step (default: nothing)."""

    def should_draft(self) -> bool:
        """Whether to call the drafter at this step at all (default: always)."""
        return True

    def audit(self) -> dict:
        return {}


class FixedSchedule(Schedule):
    def __init__(self, widths: list[int]):
        self.schedule = list(widths)
        self.max_depth = len(widths)
        self.budget = int(sum(np.cumprod(widths)))

    def widths(self, depth, logits, frontier, budget_left):
        return [self.schedule[depth]] * frontier


class HeuristicSchedule(Schedule):
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 draft tokens after a step whose drafts were
    all accepted, -1 (not below 1) otherwise."""

    LIMIT = 32  # transformers lets the chain grow without bound; cap it so that it fits any context

    def __init__(self, start: int = 5):
        self.max_depth = min(start, self.LIMIT)
        self.budget = self.LIMIT

    def widths(self, depth, logits, frontier, budget_left):
        return [1] * frontier

    def observe(self, tree, target_logits, path):
        if len(tree.tokens) and len(path) == len(tree.tokens):
            self.max_depth = min(self.max_depth + 2, self.LIMIT)
        else:
            self.max_depth = max(1, self.max_depth - 1)


class CertifiedSchedule(Schedule):
    """Widths from the drafter-side certificate against an online estimate of the drafter's KL (module docstring)."""

    def __init__(self, max_depth: int = 8, max_width: int = 1, budget: int | None = None, quantile: float = 0.9):
        if not 0 < quantile <= 1:
            raise ValueError(f"the KL quantile must be in (0, 1], got {quantile}")
        self.max_depth, self.max_width, self.quantile = max_depth, max_width, quantile
        self.budget = budget if budget is not None else int(sum(max_width**d for d in range(1, max_depth + 1)))
        self.kls: list[float] = []
        self.eps_hat = 0.0
        self.held = self.held_covered = self.exceeded = 0
        self._backoff = self._skip = 0  # steps to decode without the drafter after it certified nothing

    def widths(self, depth, logits, frontier, budget_left):
        if logits is None:  # no distribution to certify: draft a plain chain
            return [1] * frontier if budget_left >= frontier else [0] * frontier
        out = []
        for i in range(frontier):
            m = 0
            for width in range(1, min(self.max_width, logits.shape[-1] - 1) + 1):
                if float(drafter_certificate(logits[i], width)) > self.eps_hat:
                    m = width
                    break
            m = m if m <= budget_left else 0  # a cut width would void the guarantee: no children instead
            budget_left -= m
            out.append(m)
        return out

    def should_draft(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    def observe(self, tree, target_logits, path):
        # A drafter that certified nothing is not even run for a while: 1, 2, 4, ... 32 steps, until it drafts again.
        self._backoff = 0 if tree.tokens else min(max(1, 2 * self._backoff), 32)
        self._skip = self._backoff
        positions = [p for p in [-1] + path if tree.children(p) and tree.expanded[p + 1]]
        if not positions or tree.logits is None:
            return
        rows = torch.tensor([p + 1 for p in positions])
        divergence = kl(target_logits[rows], tree.logits[rows]).tolist()
        greedy = target_logits[rows].argmax(-1).tolist()
        for pos, d, x0 in zip(positions, divergence, greedy):
            if d <= self.eps_hat:
                self.held += 1
                self.held_covered += int(x0 in [tree.tokens[c] for c in tree.children(pos)])
            else:
                self.exceeded += 1
        self.kls += [d for d in divergence if math.isfinite(d)]
        if self.kls:
            self.eps_hat = float(np.quantile(self.kls, self.quantile))

    def audit(self):
        return {"held": self.held, "held_covered": self.held_covered, "exceeded": self.exceeded}


def make_schedule(k: int | str | None = None, tree: str | list[int] | None = None, quantile: float = 0.9) -> Schedule:
    """A schedule from the ``k`` / ``tree`` options (see the module docstring); default: a chain of 4."""
    if tree is not None and k is not None:
        raise ValueError("give either k (a chain) or a tree width schedule, not both")
    text = str(tree if tree is not None else (k if k is not None else 4)).strip()
    name, _, arg = text.partition(":")
    if name in ("auto", "heuristic"):
        try:
            n = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"{text!r}: {name} takes a whole number, e.g. {name}:8") from None
        if n is not None and n < 1:
            raise ValueError(f"{text!r}: the bound must be >= 1")
        if name == "heuristic":
            if tree is not None:
                raise ValueError("the heuristic schedule drafts chains: use k=heuristic")
            return HeuristicSchedule(n or 5)
        if tree is not None:
            return CertifiedSchedule(max_depth=8, max_width=8, budget=n or 16, quantile=quantile)
        return CertifiedSchedule(max_depth=n or 8, max_width=1, quantile=quantile)
    if tree is None:
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"k (draft length) must be a whole number >= 1, auto[:K] or heuristic[:K]; got {text!r}") \
                from None
        if k < 1:
            raise ValueError(f"k (draft length) must be a whole number >= 1, got {k}")
        return FixedSchedule([1] * k)
    if isinstance(tree, str):
        try:
            tree = [int(w) for w in tree.split(",")]
        except ValueError:
            raise ValueError(f"a tree schedule is widths per depth such as 4,2,1, or auto[:B]; got {tree!r}") \
                from None
    if not tree or any(w < 1 for w in tree):
        raise ValueError(f"a tree schedule needs widths >= 1 per depth, got {tree!r}")
    return FixedSchedule(list(tree))
