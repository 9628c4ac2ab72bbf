"""Certificate classes of chain positions and their measured acceptance rates alpha_0 .. alpha_CERTIFIED.

A position's *class* is how many of the KL thresholds its drafter-side certificate D_q(1) (THEORY.md section 7)
exceeds:

    class = #{ l in levels : D_q(1) > eps(l q) },   eps(x) the x-quantile of the measured KLs, q = ``quantile``,

so class ``CERTIFIED`` holds the certified positions (D_q(1) > eps_hat = eps(q)). Why the class says much about a
position's odds: if KL(p || q) <= D_q(1) the target's greedy token is the drafter's, so a position's acceptance is at
least the chance that its KL is below its D_q(1), which the quantile level of the measured KLs that D_q(1) reaches
estimates (were KL independent of D_q(1)). A drafter without a distribution may name its positions' classes itself,
below ``CERTIFIED`` (the n-gram drafter: the size of the match behind the token less one; on Spec-Bench a token
behind a match of 1 token was the target's 19% of the time, of 3 tokens 72-76%); one that names none has every
position in class 0.

Each class's rate is measured from the chain positions of that class that verification reached
(:class:`ClassRates`), and a position expected before its class is known gets the classes' mean rate, weighed by
their shares of the latest positions.
"""

from __future__ import annotations

from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import CERTIFIED, ScheduleSettings


def kl_thresholds(kls, quantile: float, levels) -> list[float]:
    """eps(l q) for each l in ``levels``: the thresholds of the classes, eps_hat (the last level's, 1) last. Linear
    quantiles of ``kls`` (numpy's default method, in plain Python: 3x faster on 512 values); all 0 without KLs.

    >>> kl_thresholds([0.0, 1.0, 2.0, 3.0, 4.0], 0.5, (0.5, 1.0))
    [1.0, 2.0]
    >>> kl_thresholds([], 0.9, (0.25, 0.5, 1.0))
    [0.0, 0.0, 0.0]
    """
    if not kls:
        return [0.0] * len(levels)
    xs, last = sorted(kls), len(kls) - 1
    out = []
    for level in levels:
        at = level * quantile * last
        lo = int(at)
        hi = min(lo + 1, last)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (at - lo))
    return out


def certificate_class(certificate: float, thresholds) -> int:
    """A position's class: how many ``thresholds`` its D_q(1) exceeds (``CERTIFIED``: all of them, certified).

    >>> certificate_class(1.5, [0.5, 1.0, 2.0]), certificate_class(2.5, [0.5, 1.0, 2.0])
    (2, 3)
    """
    return sum(certificate > e for e in thresholds)


class ClassRates:
    """The acceptance rates of a chain's positions by class: the history's (decayed over generations) and this
    generation's, which follow the text being generated faster.

    From the history's decayed counts (:meth:`History.record_position`), with u the rate of all uncertified classes
    pooled the same way:

        a_CERTIFIED = (accepted + 1) / (reached + 2),
        a_l = (accepted_l + 2 u) / (reached_l + 2)   for l < CERTIFIED,   u = (sum accepted + 1) / (sum reached + 2),

    a class seen little being drawn toward u rather than 1/2 (uncertified positions are rare with a close drafter:
    split three ways, each class would start from 1/2 for its first dozens of positions). Within a generation, with
    P = ``prior_positions``, the rate is alpha_l = (accepted here + P a_l) / (reached here + P).
    """

    def __init__(self, history: History, settings: ScheduleSettings):
        self.history, self.settings = history, settings
        self.here = [[0, 0] for _ in range(CERTIFIED + 1)]  # this generation's positions per class: reached, accepted
        self.first = [0, 0]  # this generation's first chain positions, at every step: reached, accepted

    def alpha(self, level: int) -> float:
        """alpha_l: the measured acceptance rate of chain positions of class ``level`` (the class docstring)."""
        h = self.history
        if level == CERTIFIED:
            a = (h.accepted[level] + 1) / (h.reached[level] + 2)
        else:
            pooled = (sum(h.accepted[:CERTIFIED]) + 1) / (sum(h.reached[:CERTIFIED]) + 2)
            a = (h.accepted[level] + 2 * pooled) / (h.reached[level] + 2)
        reached, accepted = self.here[level]
        prior = self.settings.prior_positions
        return (accepted + prior * a) / (reached + prior)

    def shares(self) -> list[float]:
        """P(l): each class's share of the latest chain positions, (shares_l + 1) / (sum of shares + CERTIFIED + 1).
        Not the counts behind the rates: those decay per class, so a frequent class's saturate near
        ``recent_positions`` while a rare one's grow on and would weigh more than it occurs."""
        shares = self.history.shares
        total = sum(shares) + len(shares)
        return [(x + 1) / total for x in shares]

    def alpha_mean(self) -> float:
        """The rate a chain position expects before its class is known: sum over classes l of P(l) alpha_l.

        NOTE: the pooled counts, which over-weigh the rare classes, read about 0.93 where this reads 0.97 with
        ``compiled:int4``, and the lookahead then stopped 85 chains of 225 after 2 tokens, before the lengths that
        verify dearly."""
        return sum(p * self.alpha(level) for level, p in enumerate(self.shares()))

    def alpha_first(self) -> float:
        """The acceptance rate of this generation's first chain positions, counted at every step whether measured or
        not (drafted, or judged by the target's bonus token where the chain stopped), with the mean rate counting as
        P positions: (accepted + P alpha_mean) / (reached + P). A settled chain, which knows its first position's
        class at its measured steps only, drafts by it at the others.

        NOTE: on a translation the draft head was accepted at 2-4% of the steps where the history's classes said
        0.2-0.3; a class rate learnt at one step in 8 drafted at 45 of 46 steps."""
        reached, accepted = self.first
        prior = self.settings.prior_positions
        return (accepted + prior * self.alpha_mean()) / (reached + prior)

    def record(self, level: int, accepted: bool) -> None:
        """A chain position of class ``level`` that verification reached (drafted, or judged where the chain
        stopped), in the history (decayed) and in this generation's counts."""
        self.history.record_position(level, accepted, self.settings.recent_positions)
        self.here[level][0] += 1
        self.here[level][1] += accepted

    def record_first(self, accepted: bool) -> None:
        """A step's first chain position, drafted or judged: whether the target took its token."""
        self.first[0] += 1
        self.first[1] += accepted
