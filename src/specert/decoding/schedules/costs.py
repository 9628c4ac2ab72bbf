"""The certified chain's cost model, from the step timings in a :class:`~.history.History`.

Every cost is in one-token target forwards (the unit, :func:`forward_seconds`):

=====  ======================================================================================================
F      a step's fixed cost besides the target's forward: the drafter catching up with the context, bookkeeping
c      a drafted token's marginal cost of drafting (its verification is in V)
V(n)   the target's forward when it verifies n drafted tokens; V(0) = 1, a plain forward
C_n    a step that drafts n tokens: F + V(n) + n c
=====  ======================================================================================================

and lambda, the tokens per target forward the drafter's latest chain steps reached (:func:`drafting_rate`), is the
price of a forward in tokens. Every timing enters as a median (of the steps that drafted n tokens, for the line):
noise on a shared machine is one-sided (a preempted forward is slower, never faster), and a mean would carry a few
slowed steps into every decision for the 256 steps they stay in the history.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import ScheduleSettings


@dataclass(frozen=True)
class Prices:
    """A chain's prices for a step: F (``fixed``), c (``token``), V(0 .. max_depth) (``verify``) and lambda
    (``rate``), as :func:`price` computed them."""

    fixed: float
    token: float
    verify: tuple[float, ...]
    rate: float


def verify_prior(drafted: int, settings: ScheduleSettings) -> float:
    """V(n) before it is measured: ``verify_fixed + n verify_per_token`` for n >= 1, 1 (a plain forward) for n = 0.

    >>> verify_prior(0, ScheduleSettings()), round(verify_prior(2, ScheduleSettings()), 2)
    (1.0, 1.18)
    """
    return settings.verify_fixed + settings.verify_per_token * drafted if drafted else 1.0


def medians(pairs) -> dict:
    """{key: (median of its values, how many)} for (key, value) pairs."""
    groups = defaultdict(list)
    for key, value in pairs:
        groups[key].append(value)
    return {key: (statistics.median(values), len(values)) for key, values in groups.items()}


def least_squares_line(x, y, w) -> tuple[float, float]:
    """(a, b) of the weighted least-squares line y = a + b x, for x that varies (np.polyfit's answer, in plain
    Python: for a handful of points numpy costs more in overhead than in arithmetic).

    >>> least_squares_line([1, 2, 3], [3, 5, 7], [1, 1, 1])
    (1.0, 2.0)
    """
    total = sum(w)
    mx, my = sum(wi * xi for wi, xi in zip(w, x)) / total, sum(wi * yi for wi, yi in zip(w, y)) / total
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    b = sxy / sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    return my - b * mx, b


def forward_seconds(history: History, settings: ScheduleSettings) -> float | None:
    """The unit: a one-token target forward's seconds. The median, over the latest steps that verified at most one
    drafted token (about one forward's work), of each one's seconds over its prior V (:func:`verify_prior`) once
    ``min_timings`` were timed, else the same over every latest step; None before any."""
    short = [s / verify_prior(n, settings) for n, _, s in history.steps if n <= 1]
    scaled = short if len(short) >= settings.min_timings else \
        [s / verify_prior(n, settings) for n, _, s in history.steps]
    return statistics.median(scaled) if scaled else None


def step_costs(history: History, settings: ScheduleSettings, token: float | None = None) -> tuple[float, float]:
    """(F, c). Given c (``token``): (0, c). Measured: the least-squares line seconds = a + b n through the median
    seconds outside the target's forward of the latest steps that drafted n tokens, weighed by their number, once n
    spreads enough for a slope (sum of (n - mean n)^2 > ``min_spread``) and the line has a >= 0 and b > 0; else
    (0, the median seconds per drafted token of the steps that drafted); a and b over the unit. (0, 0) before any
    step drafted. The steps that drafted nothing enter the line, not the ratio: their seconds are the step's own."""
    if token is not None:
        return 0.0, token
    steps, one = history.steps, forward_seconds(history, settings)
    n = [drafted for drafted, _, _ in steps]
    if not one or not any(n):
        return 0.0, 0.0
    a, b, mean = -1.0, 0.0, sum(n) / len(n)
    if sum((x - mean) ** 2 for x in n) > settings.min_spread:
        groups = medians((drafted, seconds) for drafted, seconds, _ in steps)
        a, b = least_squares_line(list(groups), [m for m, _ in groups.values()], [k for _, k in groups.values()])
    if not (a >= 0 and b > 0):
        a, b = 0.0, statistics.median(seconds / drafted for drafted, seconds, _ in steps if drafted)
    return a / one, b / one


def verify_costs(history: History, settings: ScheduleSettings, max_depth: int) -> list[float]:
    """V(0), V(1), ... V(max_depth), and ``history.verified`` brought up to date.

    V(n) for n >= 1 is the median, over the latest steps that verified n drafted tokens once ``min_timings`` of them
    were, of each one's seconds over the unit of its time: the median of the latest ``unit_window`` verifications of
    at most one drafted token before it (each over its prior V), or :func:`forward_seconds` before any. A measured V
    is recorded in ``history.verified`` and outlives its timings by ``keep_verified`` steps. A length without one is
    priced by the measured lengths: on the straight line between the two around it, past the longest at the
    longest one's V, and by the prior :func:`verify_prior` while none is measured (or before any step was timed).

    NOTE: optimistic on purpose. A chain drafts to a length priced cheaply and so measures it, but never to one
    priced dearly: a line through the short lengths, whose per-token cost on a CPU is twice the long ones', kept
    k=auto's chains short for a whole run (``int4``: mean acceptance length 3.8). A CPU's matrix kernels make V
    uneven (on 2 cores 8 or 16 tokens verify cheaper than 9 or 13; ``python benchmarks/speed.py`` prints the table),
    and the chain drafts to the lengths that verify cheaply."""
    table, one = [verify_prior(n, settings) for n in range(max_depth + 1)], forward_seconds(history, settings)
    if not one:
        return table
    ratios, near = [], deque(maxlen=settings.unit_window)  # each verification over the unit forwards just before it
    for n, _, seconds in history.steps:
        if n <= 1:
            near.append(seconds / verify_prior(n, settings))
        if 0 < n < len(table):
            ratios.append((n, seconds / (statistics.median(near) if near else one)))
    known, now = history.verified, history.timed
    known.update((n, (v, now)) for n, (v, count) in medians(ratios).items() if count >= settings.min_timings)
    for n in [n for n, (_, at) in known.items() if now - at > settings.keep_verified]:
        del known[n]
    measured = sorted(n for n in known if n < len(table))
    if not measured:
        return table
    costs = [1.0] + [known[n][0] for n in measured]  # V(0) = 1: a plain forward
    return [1.0] + np.interp(range(1, len(table)), [0] + measured, costs).tolist()


def drafting_rate(yields, verify, fixed: float, token: float) -> float:
    """lambda: the tokens per target forward of the steps ``yields`` ((drafted n, emitted) pairs), each step's cost
    C_n = F + V(n) + n c (V past its table at its last entry), at least 1 (plain decoding, always available):

        lambda = max(1, sum of emitted / sum of C_n),   1 without steps.

    >>> drafting_rate([(2, 3)], [1.0, 1.2, 1.4], 0.1, 0.25)
    1.5
    """
    cost = sum(fixed + verify[min(n, len(verify) - 1)] + n * token for n, _ in yields)
    return max(1.0, sum(emitted for _, emitted in yields) / cost) if yields else 1.0


def price(history: History, settings: ScheduleSettings, max_depth: int, token: float | None = None) -> Prices:
    """A chain's prices from ``history``: (F, c) (:func:`step_costs`, c given as ``token``), V (:func:`verify_costs`)
    and lambda over the latest chain steps at those costs (:func:`drafting_rate`)."""
    fixed, c = step_costs(history, settings, token)
    verify = verify_costs(history, settings, max_depth)
    return Prices(fixed, c, tuple(verify), drafting_rate(history.yields, verify, fixed, c))
