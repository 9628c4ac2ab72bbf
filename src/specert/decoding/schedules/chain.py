"""The certified chain: draft while the tokens the next positions are expected to add pay for drafting them.

Drafted position j survives verification with probability S_j = alpha_1 ... alpha_j, each factor its position's
class's rate (:mod:`.classes`), so a chain of k drafted tokens yields, the bonus token included,

    E_k = 1 + S_1 + ... + S_k   tokens   for   C_k = F + V(k) + k c   target forwards (:mod:`.costs`).

The stopping rule. Position k + 1, whose logits the drafter has computed, is drafted while some h >= 1 more
positions add more tokens than they cost at the drafter's rate lambda:

    G_k = max over h >= 1 of (E_{k+h} - E_k) - lambda (V(k+h) - V(k) + (h - s) c) > 0,

s = 1 where the forward that scored position k + 1 is spent (h tokens then need h - 1 more forwards to score the
positions between them), s = 0 where it is not; h runs to the deepest position the step may draft. Position k + 1
survives with S_{k+1} = S_k alpha (its class's rate); the positions after it, whose class is not known yet, with the
classes' mean rate alpha_mean (:meth:`~.classes.ClassRates.alpha_mean`), so that E_{k+h} - E_k = S_{k+1} (1 + alpha_mean
+ ... + alpha_mean^(h-1)). This is the condition for the best long-run rate (total tokens / total cost, a
renewal-reward ratio) with lambda the rate the policy reaches, as in Dinkelbach's method for fractional programs;
comparing with the step's own E_k / C_k instead stops long chains too early (after many sure tokens that ratio exceeds
what the drafter reaches on average). Looking ahead (h > 1) matters because the first drafted token carries the
verification's fixed cost V(1) - 1 and V is uneven: a chain that opens on an uncertified token may still pay over the
certified ones after it. For a drafter far from the target the rates below certification are small and the chain
ends at the first uncertified position (the paper's rule); for a close, cheap one it runs on past positions certified
nearly to eps_hat and stops at the ones far below.

The first position's logits (k = 0) are the drafter catching up with the context, spent too (s = 1) where drafting
pays (lambda > 1); where it pays no more than plain decoding (lambda <= 1) a step that drafts nothing sends the
drafter into the back-off (:mod:`.backoff`), which saves that forward at the next steps, so s = 0 there. NOTE: the
skipped steps save F too, but charging it as well made a young history's k=auto back off where the draft head pays:
0.91 [0.86, 0.96] of k=1 on one category and 0.993 over all prompts, against 0.97 [0.88, 1.07] and 1.004 charging c
alone (``python benchmarks/adaptive.py --per-category 6 --drafter head --shape k=1 --shape k=auto``).

Near the end of a generation there is no long run to earn lambda in: what the chain does not draft, plain decoding
must produce, so lambda is 1 once the room left is no more than the latest chains' longest. NOTE: a draft head's
chains are one token; with the chain's bound instead, its last 16 tokens were a fifth of its steps, drafted at rate 1
and backing off after every stop.

Scoring the next position (:meth:`CertifiedChain.may_extend`): whether to run the drafter on the chain's last token
for the logits after it (a forward, lambda c) is decided before that forward, by the classes it may find there. With
P(l) the share of class l among the latest positions and N_l = G at that position were it of class l, it scores when

    sum over l of P(l) max(N_l, 0) - lambda c > 0.

NOTE: scoring whenever some class would pay ran the draft head's second forward at nearly every step for a position
it drafted at 8 steps in 460, 5-11% slower than a chain of one.

Settled chains (:meth:`CertifiedChain.is_settled`): a chain is one token whatever its class when every class pays at
the first position (G_0 > 0 at each alpha_l) and knowing the class is worth less than measuring it. The class decides
only whether to score a second position, worth

    W = sum over l of P(l) max(M_l, 0)   tokens a step,   M_l the scoring rule's left side after a first of class l,

against lambda ``measure_cost`` to measure every step: settled when W <= lambda ``measure_cost``, once the classes'
rates rest on ``settle_after`` measured positions. A settled chain then measures one step in ``sample_every`` (the
drafter's certificate, the position's class, the KL after it: the rates, eps_hat and the audit learn from that sample)
and at the others drafts one token while this generation's first positions pay for it
(:meth:`~.classes.ClassRates.alpha_first`). NOTE: the draft head's chain is settled on 2 CPU cores: its acceptance
(0.2-0.3) pays for a verification that costs about a plain forward, not for a second token's. Settled only where no
class scored (W = 0), its class-1 positions in extraction, accepted 65-94% of the time, kept it measuring every step
for a second token drafted at 0-9 steps per generation (k=auto over k=1 on 10 extraction prompts: 0.995).

Judged stops. Where a chain stops, the drafter has computed its next token and the target's forward computes its own
greedy token there for free (the bonus token): every stop after a fully accepted chain is a measured position of its
class too, so the rates are learnt without drafting the tokens to find out (by strict greedy agreement: an
underestimate under a relaxed rule). A drafter that names neither a distribution nor its next token leaves nothing to
judge, so a low estimate would stop it for good: the step after a back-off drafts one token whatever its estimate (a
probe; one rejected counts as a step that drafted nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specert.decoding.schedules.classes import ClassRates, certificate_class
from specert.decoding.schedules.costs import Prices, price, verify_costs
from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import CERTIFIED, ScheduleSettings
from specert.theory.certificates import top1_certificates
from specert.theory.tensors import argmax


def drafting_gain(depth: int, survive: float, ahead: float, rate: float, token: float, verify, depths: int) -> float:
    """G_k, the stopping rule's left side (module docstring), at ``depth`` k: what drafting position k + 1 earns at
    best over the chain lengths k + h, h = 1 .. min(``depths`` - k (at least 1), len(``verify``) - 1 - k); -inf if
    none. ``survive`` S_{k+1}, ``ahead`` the rate of the positions after it, ``rate`` lambda, ``token`` c, ``verify``
    V(0), V(1), ...; the forward that scored position k + 1 is spent (s = 1) if k > 0 or lambda > 1.

    A first token that only breaks even alone (0.75 - 1.5 (V(1) - V(0)) = 0) pays with the sure ones after it
    (h = 3: 2.25 - 1.5 (0.75 + 2 c)):

    >>> drafting_gain(0, 0.75, 1.0, 1.5, 0.125, [1.0, 1.5, 1.625, 1.75], 3)
    0.75
    """
    spent = depth > 0 or rate > 1
    best, gain, term = -math.inf, 0.0, survive
    for h in range(1, min(max(1, depths - depth), len(verify) - 1 - depth) + 1):
        gain, term = gain + term, term * ahead
        # verifying k + h drafted tokens instead of k (from k = 0: a plain forward becomes a verification)
        best = max(best, gain - rate * (verify[depth + h] - verify[depth] + (h - spent) * token))
    return best


def scoring_gain(depth: int, survive: float, alphas, shares, ahead: float, rate: float, token: float, verify,
                 depths: int) -> float:
    """The scoring rule's left side (module docstring) for the position at ``depth``, after a token that survives
    with ``survive``: sum over classes l of P(l) max(G at survive alpha_l, 0) - lambda c, with ``alphas`` the
    classes' rates alpha_l and ``shares`` their P(l)."""
    value = sum(p * max(drafting_gain(depth, survive * a, ahead, rate, token, verify, depths), 0.0)
                for a, p in zip(alphas, shares))
    return value - rate * token


def settling_worth(alphas, shares, ahead: float, rate: float, token: float, verify, depths: int) -> float:
    """W (module docstring): what knowing the first position's class is worth a step, in tokens, when every class
    pays there: sum over classes l of P(l) max(M_l, 0), M_l = :func:`scoring_gain` at the second position after a
    first of class l; ``alphas``, ``shares`` and the rest as there."""
    return sum(p * max(scoring_gain(1, a, alphas, shares, ahead, rate, token, verify, depths), 0.0)
               for a, p in zip(alphas, shares))


@dataclass
class ChainStep:
    """What the chain did at one step, for the verified step to judge (:meth:`CertifiedChain.finish`)."""

    drafted: list = field(default_factory=list)  # each drafted position's class (None: not measured)
    survive: float = 1.0  # S_k, the chance the latest drafted token survives
    stop: tuple | None = None  # where it stopped: (its class or None if not measured, the drafter's token there)
    asked: bool = False  # the drafter asked for the first width (it had something to draft)
    probed: bool = False  # a probe: one token drafted whatever the estimate (the module docstring)
    measured: bool = True  # its classes and the KLs after it are measured

    def first_accepted(self, tree, target_logits: torch.Tensor, path: list[int]) -> bool | None:
        """Whether the first position's token was the target's (drafted, or judged where the chain stopped); None if
        it was neither drafted nor judged. ``target_logits [1 + N, V]``."""
        if tree.tokens:
            return bool(path)
        if self.stop is not None:
            return int(argmax(target_logits[0])) == self.stop[1]
        return None

    def judged(self, tree, target_logits: torch.Tensor, path: list[int]) -> list[tuple[int, bool]]:
        """(class, accepted) of each measured position verification reached: the drafted ones up to the first
        rejected, and the stop after a fully accepted chain (judged by the bonus token)."""
        seen = [(level, j < len(path)) for j, level in enumerate(self.drafted[: len(tree.tokens)])
                if j <= len(path) and level is not None]
        if self.stop is not None and self.stop[0] is not None and len(path) == len(self.drafted):
            level, token = self.stop
            seen.append((level, int(argmax(target_logits[len(path)])) == token))
        return seen


class CertifiedChain:
    """The certified chain's policy and state: its prices, the rate lambda in effect, whether it is settled, and the
    step being drafted. ``rates`` are the classes' (shared with the schedule, which records what verification
    judged); ``token_cost`` c when given, else measured."""

    def __init__(self, settings: ScheduleSettings, history: History, rates: ClassRates, max_depth: int,
                 token_cost: float | None = None):
        self.settings, self.history, self.rates = settings, history, rates
        self.max_depth, self.token_cost = max_depth, token_cost
        self.room = 10**9  # drafted tokens the generation can still use (the schedule's ``room``)
        self.prices: Prices | None = None  # as last priced (every few steps)
        self.rate = 1.0  # lambda in effect at this step: prices.rate, or 1 near the generation's end
        self.settled = False  # one token whatever its class, as last priced
        self.steps = 0  # the steps observed: a settled chain measures one in ``sample_every``
        self.step = ChainStep()
        self._pricings = 0  # steps since the first pricing

    @property
    def depths(self) -> int:
        """The deepest position this step may draft: the chain's bound, or the room left if less."""
        return min(self.max_depth, self.room)

    @staticmethod
    def measuring(distribution: bool, eps_hat: float) -> bool:
        """Whether the chain's classes are measured: once eps_hat is, for a drafter with a distribution (before,
        every position would count as uncertified); from the first step for one without (every position in its
        named class, or class 0: the rule runs on those rates alone)."""
        return eps_hat > 0 or not distribution

    def _token_and_verify(self) -> tuple[float, tuple]:
        """(c, V) as priced; before the first pricing (a direct call) c = 0 and V measured now."""
        if self.prices is None:
            return 0.0, tuple(verify_costs(self.history, self.settings, self.max_depth))
        return self.prices.token, self.prices.verify

    def gain(self, depth: int, survive: float, ahead: float | None = None) -> float:
        """G at ``depth`` for a token that survives with ``survive`` (:func:`drafting_gain`) at this step's prices;
        ``ahead`` alpha_mean, when the caller has it."""
        token, verify = self._token_and_verify()
        ahead = self.rates.alpha_mean() if ahead is None else ahead
        return drafting_gain(depth, survive, ahead, self.rate, token, verify, self.depths)

    def pays(self, depth: int, survive: float) -> bool:
        """Whether drafting on at ``depth`` pays for some chain length: G > 0."""
        return self.gain(depth, survive) > 0

    def scoring(self, depth: int, survive: float) -> float:
        """The scoring rule's left side at ``depth`` after a token surviving with ``survive`` (:func:`scoring_gain`)."""
        ahead = self.rates.alpha_mean()
        token, verify = self._token_and_verify()
        alphas = [self.rates.alpha(level) for level in range(CERTIFIED + 1)]
        return scoring_gain(depth, survive, alphas, self.rates.shares(), ahead, self.rate, token, verify, self.depths)

    def is_settled(self, eps_hat: float) -> bool:
        """Whether the chain is settled now (module docstring): every class pays at the first position, W <=
        lambda ``measure_cost``, eps_hat is measured, the step may draft 2 tokens or more, and the classes' rates rest
        on ``settle_after`` positions."""
        s = self.settings
        if eps_hat == 0 or self.depths < 2 or sum(self.history.reached) < s.settle_after:
            return False
        alphas = [self.rates.alpha(level) for level in range(CERTIFIED + 1)]
        ahead, (token, verify) = self.rates.alpha_mean(), self._token_and_verify()
        if not all(drafting_gain(0, a, ahead, self.rate, token, verify, self.depths) > 0 for a in alphas):
            return False
        worth = settling_worth(alphas, self.rates.shares(), ahead, self.rate, token, verify, self.depths)
        return worth <= self.rate * s.measure_cost

    def _price(self, eps_hat: float) -> None:
        """A step's start: its prices (every ``reprice_every`` steps, ``settled_reprice_every`` when settled, every
        step while fewer than ``price_every_step_below`` were timed), lambda in effect, and whether it is settled
        (again whenever priced or lambda in effect changed)."""
        s = self.settings
        every = s.settled_reprice_every if self.settled else s.reprice_every
        priced = self._pricings % every == 0 or len(self.history.steps) < s.price_every_step_below
        if priced:
            self.prices = price(self.history, s, self.max_depth, self.token_cost)
        self._pricings += 1
        longest = max((n for n, _ in self.history.yields), default=self.max_depth)
        rate = self.prices.rate if self.room > longest else 1.0
        if priced or rate != self.rate:
            self.rate = rate
            self.settled = self.is_settled(eps_hat)

    def width(self, depth: int, q: torch.Tensor | None, certificate: float | None, guess: tuple[int, int] | None,
              thresholds: list[float], probe: bool = False) -> int:
        """The width (0 or 1) of the chain's position at ``depth``: ``q [V]`` the drafter's logits there (None
        without a distribution), ``certificate`` its D_q(1) if the drafter computed it, ``guess`` (class, token) of a
        drafter without a distribution, ``thresholds`` the classes' (eps_hat last), ``probe`` whether a back-off
        ended at the previous step. Depth 0 starts the step."""
        eps_hat = thresholds[-1]
        if depth == 0:
            self.step = ChainStep(asked=True)
            self._price(eps_hat)
            self.step.probed = q is None and guess is None and probe
            self.step.measured = q is None or certificate is not None or not self.settled \
                or self.steps % self.settings.sample_every == 0
            if not self.step.measured:  # settled: one token whatever its class (not worth a certificate, nor the
                if self.pays(0, self.rates.alpha_first()):  # KL after it), while this generation's first positions
                    self.step.drafted.append(None)  # pay for it
                    return 1
                self.step.stop = (None, int(argmax(q)))  # (not measured: q is given) for the bonus token to judge
                return 0
        step = self.step
        if certificate is None and q is not None and eps_hat > 0:
            certificate = float(top1_certificates(q[None]))
        if guess is not None:
            level = guess[0]
        else:
            level = certificate_class(certificate, thresholds) if q is not None and eps_hat > 0 else 0
        survive = step.survive * self.rates.alpha(level)
        probing = depth == 0 and step.probed
        if self.measuring(q is not None, eps_hat) and not probing and not self.pays(depth, survive):
            # what it would have drafted, for verification to judge (a drafter that names neither: not known)
            step.stop = (level, int(argmax(q))) if q is not None else guess
            return 0
        step.survive = survive
        step.drafted.append(level)
        return 1

    def may_extend(self, depth: int) -> bool:
        """Whether to score the position at ``depth`` (the scoring rule; never at a settled chain's unmeasured
        steps, which draft one token)."""
        return self.step.measured and self.scoring(depth, self.step.survive) > 0

    def finish(self) -> ChainStep:
        """End the step (the schedule observes it verified): its record, for the schedule to learn from."""
        step, self.step = self.step, ChainStep()
        self.steps += 1
        return step
