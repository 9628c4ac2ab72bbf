"""The back-off: after a step that drafted nothing, plain decoding for 1, 2, 4, ... steps before the drafter runs again.

A drafter far from the target drafts little, and running it costs even when its drafts are not used; skipping it
costs nothing but the tokens it would have drafted. Which empty steps count is the schedule's call
(:meth:`~specert.decoding.schedules.CertifiedSchedule.observe`): a tree's every empty step (nothing else says whether
its drafting pays), a chain's only where its stopping rule stopped the first position and drafting does not pay
(lambda <= 1), not where the drafter had nothing to draft.

NOTE: an n-gram drafter finds no match at about half of Spec-Bench's stem steps; backed off then, ``ngram:3`` ran at
201 of 248 steps of 6 stem prompts, and at 238 of 241 (every step with room for a draft) where it is not.
``tree=auto:16`` with ``ngram:3``, which drafts width-1 trees 8 deep at every match, ran at 0.92x plain greedy without
the back-off and 0.99x with it (``python benchmarks/adaptive.py --drafter ngram:3 --shape tree=auto:16``).
"""

from __future__ import annotations


class BackOff:
    """Steps to decode without the drafter. ``probe`` says that the step after a back-off has come: a chain's drafter
    without a distribution drafts one token there whatever its estimate (:class:`~.chain.CertifiedChain`)."""

    def __init__(self, longest: int = 32):
        self.longest = longest
        self.length = 0  # the latest back-off's length: 0, or 1, 2, 4, ... longest
        self.skip = 0  # steps of it still to skip
        self.probe = False  # the back-off ended at the previous step

    def should_draft(self) -> bool:
        """Whether to run the drafter at this step (the decoder asks before each step)."""
        if self.skip:
            self.skip -= 1
            self.probe = not self.skip
            return False
        return True

    def after(self, drafted: bool) -> None:
        """A counted step: none after a step that drafted (or whose drafting pays), else twice the last, at most
        ``longest``."""
        self.length = 0 if drafted else min(max(1, 2 * self.length), self.longest)
        self.skip = self.length
