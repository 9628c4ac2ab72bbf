"""The certified schedules' tunables: :class:`ScheduleSettings`, one frozen record of documented defaults.

A :class:`~specert.decoding.schedules.CertifiedSchedule` (or :func:`~specert.decoding.schedules.make_schedule`) takes
one; the defaults are the ones the schedules ship with. Each NOTE says what a value trades and, where a figure decided
it, the figure. The figures are from 2 CPU cores with the embedded SmolLM2-135M target: speed ratios, steps and
acceptance per config from ``python benchmarks/adaptive.py --per-category 6 --drafter D --shape k=1 --shape k=auto``,
the target's forward of n tokens against one from ``python benchmarks/speed.py``, per-position certificates, KLs and
acceptance from ``specert generate --drafter D --k 12 --trace FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

CERTIFIED = 3  # the certified class: classes run 0 .. CERTIFIED, one per KL level a position's D_q(1) exceeds


@dataclass(frozen=True)
class ScheduleSettings:
    """Tunables of the certified schedules. Units: one-token target forwards for costs, steps or chain positions for
    counts.

    Verification costs (:mod:`.costs`):

    ``verify_fixed``, ``verify_per_token`` (0.8, 0.19)
        The prior of V(n), the verifying forward's cost in one-token forwards: ``verify_fixed + n verify_per_token``
        for n >= 1 drafted tokens (V(0) = 1), until V(n) is measured. NOTE: on 2 CPU cores, relative to one token,
        forwards of 2 tokens took 0.98-1.00, 4: 1.25-1.34, 5: 1.49-1.63, 8: 1.89-2.07, 9: 2.40-2.55 (embedded model,
        three prompts; ``python benchmarks/speed.py`` prints the table); on a GPU both are near 0.
    ``min_timings`` (3)
        Verifications of n drafted tokens timed before V(n) is theirs instead of the prior; also the one-token
        verifications before the unit is theirs alone.
    ``keep_verified`` (256)
        Steps a length's measured V is kept after its timings left the latest steps. NOTE: priced optimistically
        again at once, the draft head's chain drafted a second token at 13 of 714 steps, none accepted, three every
        256 steps, to measure again that it does not pay; kept for good, a V read high once is never corrected
        (``int4`` settled at one token a step on a V(2) of 1.96, where it measures 1.17-1.34).
    ``unit_window`` (5)
        V(n) divides each verification's seconds by the median of the latest ``unit_window`` one-token forwards
        before it. NOTE: a forward's seconds grow with the context (31 ms at 60 tokens, 36 ms at 750): against one
        median over the history the draft head's V(2) read 0.91 of a one-token forward against a V(1) of 0.99, where
        at the same context they measure 1.12-1.14 and 1.04-1.05.
    ``min_spread`` (8)
        Sum of (n - mean n)^2 over the timed steps before the drafting cost is a fitted line rather than one ratio.

    Pricing (:class:`.chain.CertifiedChain`):

    ``reprice_every`` (8), ``price_every_step_below`` (64)
        A chain's prices (F, c, V, lambda) are recomputed every ``reprice_every`` steps, and at every step while
        fewer than ``price_every_step_below`` steps were timed. NOTE: medians and a line over the latest 256 steps
        move little from one step to the next, and pricing took 0.2-0.3 ms a step, 0.6-0.8% of a draft head's step.
    ``settled_reprice_every`` (32)
        The same for a settled chain: only its rates moving can unsettle it. NOTE: at one step in 8 its pricing took
        0.25% of the draft head's decoding.

    Classes and rates (:mod:`.classes`):

    ``levels`` (0.25, 0.5, 1.0)
        The class thresholds as fractions of the quantile: a position's class is how many of the measured KLs'
        ``level * quantile`` quantiles its D_q(1) exceeds. ``CERTIFIED`` of them, non-decreasing, the last 1 (the
        threshold eps_hat itself). NOTE: on Spec-Bench (12-token chains; ``int4`` 2,248 positions, ``pruned`` 1,520)
        acceptance was 0.52 and 0.43 where D_q(1) was below the measured KLs' 0.2 quantile, 0.86 and 0.68 between 0.2
        and 0.4, 0.97 and 0.86 between 0.4 and 0.6, 1.00 and 0.96-0.98 from 0.6 to 0.9: two classes (certified or
        not) would lump positions accepted half the time with ones accepted nearly always.
    ``recent_positions`` (256)
        A class's rate weighs its position j positions ago (of that class) by (1 - 1/``recent_positions``)^j, so
        the rates follow the text being generated. Per class, not over all: uncertified positions are rare with a
        close drafter, and a window over all positions would leave them a few samples.
    ``prior_positions`` (16)
        Within a generation a class's rate counts the history's rate as this many positions of the generation.
        NOTE: ``ngram:3`` on Spec-Bench, k=auto against the history's rates alone: 1.129x against 1.108x plain
        greedy over 78 prompts, 1.221x against 1.183x over 16 prompts of extraction, translation, summarization and
        rag (``python benchmarks/adaptive.py --per-category 6 --drafter ngram:3``); a summary drafted after a
        translation accepts the n-gram drafter's copied tokens 57-59% of the time, not 88-89%.

    Settled chains (:meth:`.chain.CertifiedChain.is_settled`):

    ``sample_every`` (8)
        A settled chain measures one step in ``sample_every`` (the drafter's certificate, the KL after it).
        NOTE: those cost the draft head 0.5-0.6 ms of a 47 ms step; measured at every step, k=auto ran about 2%
        behind a chain of one making the same decisions.
    ``measure_cost`` (0.015)
        What measuring a step costs, in one-token forwards: 0.5-0.6 ms against a one-token forward of 31-36 ms on 2
        cores. A chain is settled when knowing its first position's class is worth less.
    ``settle_after`` (32)
        Measured chain positions (the decayed counts of all classes together) before a chain may settle. NOTE: a
        chain settled on its rates' prior of 1/2 learns them 8 times slower: ``int4`` from an empty history settled
        at 14 of its first 17 steps, one token a step, its first positions accepted 14 times in 15.

    Back-off (:class:`.backoff.BackOff`):

    ``max_backoff`` (32)
        After a step that drafted nothing the drafter is not run for 1, 2, 4, ... ``max_backoff`` steps.
    """

    verify_fixed: float = 0.8
    verify_per_token: float = 0.19
    min_timings: int = 3
    keep_verified: int = 256
    unit_window: int = 5
    min_spread: float = 8
    reprice_every: int = 8
    price_every_step_below: int = 64
    settled_reprice_every: int = 32
    levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    recent_positions: int = 256
    prior_positions: int = 16
    sample_every: int = 8
    measure_cost: float = 0.015
    settle_after: float = 32
    max_backoff: int = 32

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "levels" and not value >= 0:
                raise ValueError(f"ScheduleSettings.{f.name} must be >= 0, got {value!r}")
        for name in ("min_timings", "unit_window", "reprice_every", "settled_reprice_every", "recent_positions",
                     "sample_every"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"ScheduleSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        levels = tuple(self.levels)
        if len(levels) != CERTIFIED or not all(0 < a <= b for a, b in zip(levels, levels[1:] + (1.0,))) \
                or levels[-1] != 1:
            raise ValueError(f"ScheduleSettings.levels must be {CERTIFIED} non-decreasing fractions in (0, 1], the "
                             f"last 1 (eps_hat's own), got {self.levels!r}")
        object.__setattr__(self, "levels", levels)
