"""The schedule interface a drafter builds its tree by, and the two schedules that read no certificate.

Per step the decoder asks :meth:`Schedule.should_draft`, sets :attr:`Schedule.room`, lets the drafter ask
:meth:`Schedule.widths` depth by depth (and :meth:`Schedule.may_extend` before each further drafter forward), then
tells the schedule what verification judged (:meth:`Schedule.observe`) and how long the step took
(:meth:`Schedule.timed`).
"""

from __future__ import annotations

import numpy as np
import torch


class Schedule:
    """A draft shape, fixed or decided per step."""

    max_depth: int = 1
    certifies: bool = False  # whether widths() reads the drafter's certificate (a drafter need not compute it)
    budget: int = 10**9  # most nodes per tree
    room: int = 10**9  # drafted tokens the generation can still use (set by the decoder: max_new_tokens left - 1)

    @property
    def depths(self) -> int:
        """How deep to draft at this step: ``max_depth``, but no deeper than the generation has room for."""
        return min(self.max_depth, self.room)

    @property
    def max_nodes(self) -> int:
        """The most nodes a tree of this schedule can have (it must fit the target's context)."""
        return self.budget

    def widths(self, depth: int, logits: torch.Tensor | None, frontier: int, budget_left: int,
               certificate: float | None = None, guess: tuple[int, int] | None = None) -> list[int]:
        """Widths of the ``frontier`` positions at ``depth``; ``logits [frontier, V]`` are the drafter's there
        (None for drafters without a distribution), ``certificate`` D_q(1) of a frontier of one position when the
        drafter computed it with its logits (a compiled step: :mod:`specert.decoding.static_cache`; the draft head:
        from its small logits), ``guess`` (class, token) of a frontier of one position of a drafter without a
        distribution: the token it would draft there and the class of its evidence, 0 .. ``CERTIFIED`` - 1
        (:class:`~specert.drafters.ngram.NGramDrafter`: the match size behind it less one)."""
        raise NotImplementedError

    def may_extend(self, depth: int) -> bool:
        """Whether a position at ``depth`` may still get a width > 0: if not, the drafter does not score the level
        before it (a forward whose logits nothing would use). Default: yes."""
        return True

    def observe(self, tree, target_logits: torch.Tensor, path: list[int]) -> None:
        """Learn from a verified step (default: nothing)."""

    def should_draft(self) -> bool:
        """Whether to call the drafter at this step at all (default: always)."""
        return True

    def timed(self, draft_seconds: float, verify_seconds: float, drafted: int) -> None:
        """Learn a step's timings: drafting (``drafted`` tokens) and the target's verification (default: nothing)."""

    def audit(self) -> dict:
        """This generation's guarantee audit (default: none)."""
        return {}


class FixedSchedule(Schedule):
    """The same widths every step: ``widths[d]`` per position at depth d (a chain of k: ``[1] * k``)."""

    def __init__(self, widths: list[int]):
        self.schedule = list(widths)
        self.max_depth = len(widths)
        self.budget = int(sum(np.cumprod(widths)))

    def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
        return [self.schedule[depth]] * frontier


class HeuristicSchedule(Schedule):
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: a chain, +2 draft tokens after a step whose drafts
    were all accepted, -1 (not below 1) otherwise."""

    LIMIT = 32  # transformers lets the chain grow without bound; capped so that it fits any context

    def __init__(self, start: int = 5):
        self.max_depth = min(start, self.LIMIT)
        self.budget = self.LIMIT

    def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
        return [1] * frontier

    def observe(self, tree, target_logits, path):
        if len(tree.tokens) and len(path) == len(tree.tokens):
            self.max_depth = min(self.max_depth + 2, self.LIMIT)
        else:
            self.max_depth = max(1, self.max_depth - 1)
