"""Draft shapes: how many candidates each drafted position gets, fixed or decided per step.

A schedule is asked, depth by depth while the drafter builds its tree, for the width of every position of the
frontier given the drafter's logits there; it then observes each verified step.

=====================  ====================================================================================
spec (``k`` / ``tree``)  schedule
=====================  ====================================================================================
``k=4``                a chain of 4 tokens
``tree=4,2,1``         a tree, width 4 at depth 0, 2 at depth 1, 1 at depth 2
``k=auto[:K]``         certified chain: draft while the expected accepted tokens pay for drafting, at most K (16)
``tree=auto[:B]``      certified tree: each position gets the smallest m <= 8 with D_q(m) > eps_hat, at most B
                       (16) nodes, depth <= 8; a position whose m no longer fits the budget gets no children
``k=heuristic[:K]``    transformers' heuristic: start at K (5); +2 after a fully accepted step, -1 otherwise
=====================  ====================================================================================

The certified schedules use the drafter-side certificate D_q(m) (THEORY.md section 7): if the target is within
KL eps of the drafter and D_q(m) > eps, the drafter's top-m holds the target's greedy token. eps_hat is an online
estimate of the drafter's KL(p || q): the ``quantile`` (0.9) of the KLs measured at the latest 512 verified
positions (0 before the first, so a drafter's first step drafts in full). What a schedule measures about a drafter
(these KLs, acceptance by class, timings: :class:`History`) stays with the drafter for its next generation.

A tree position gets the smallest certified width. After a step that drafted nothing the drafter is not run for 1,
2, 4, ... 32 steps (plain decoding) before it is probed again, unless it is a chain's drafter whose drafting pays
(lambda > 1, below) or that had nothing to draft (the chain's rule judged nothing): a drafter far from the target
drafts little and costs little. A chain's drafter that names
neither a distribution nor its next token (``guess``) drafts one token at that probe whatever its estimate says
(below, the token where a chain stops is judged for free; unnamed, nothing is, and a low estimate would never be
revised); a probe that is rejected counts as a step that drafted nothing.

The certified chain stops where drafting stops paying. A position is *certified* when D_q(1) > eps_hat; one that
is not is certified at a lower level of the measured KLs, and that level says much about its odds: ``LEVELS``
splits positions into classes by the KL quantiles their D_q(1) exceeds, q/4, q/2 and q (q = ``quantile``):

    class = #{ l in LEVELS : D_q(1) > eps(l q) },   eps(x) the x-quantile of the measured KLs,

class 3 being the certified positions. If KL(p || q) <= D_q(1) the target's greedy token is the drafter's, so a
position's acceptance is at least the chance that its KL is below its D_q(1), which the level of the measured KLs
that D_q(1) reaches estimates (were KL independent of D_q(1)). Measured on Spec-Bench (12-token chains of ``int4``,
2,248 positions; ``pruned``, 1,520), acceptance was 0.52 and 0.43 below the level 0.2, 0.86 and 0.68 between 0.2 and
0.4, 0.97 and 0.86 between 0.4 and 0.6, 1.00 and 0.96-0.98 from 0.6 to 0.9, above the level in every bin (session
14): two classes (certified or not) lumped positions accepted half the time with ones accepted nearly always. The
schedule measures how often drafted tokens were accepted in each class (alpha_0 .. alpha_3) over about the latest
``RECENT`` (256) chain positions of the class (older ones decay): (accepted + 1) / (reached + 2), each uncertified
class drawn toward the rate of all uncertified positions instead of 1/2 while it has few; and follows the text being
generated faster than that: within a generation, a class's rate is its positions in this generation with the
history's rate counting as ``PRIOR`` (16) positions more (:meth:`CertifiedSchedule.alpha`). A summary drafted after
a translation accepts the n-gram drafter's copied tokens 57-59% of the time, not 88-89%: 256 positions of history
took several prompts to learn it, and long copied chains failed meanwhile. Where a chain stops, the drafter has
already computed its next token and the target's forward computes its own greedy token there for free (the bonus
token): every stop after a fully accepted chain is a measured position too, so the rates of the classes it stops at
are learnt without drafting their tokens to find out (there it counts strict greedy agreement: an underestimate
under a relaxed rule). Drafting position j survives verification with probability S_j = alpha_1 ... alpha_j (each
its position's class's rate), so a chain of k expects
E_k = 1 + S_1 + ... + S_k tokens for a cost of C_k = F + V(k) + k c target forwards, c being a drafted token's
marginal cost relative to a target forward of one token and F a step's fixed cost besides the target's forward (the
drafter catching up with the context, the bookkeeping), both measured from the step timings unless c is given (a
least-squares line of a step's seconds outside the target's forward against its drafted tokens; these prices are
recomputed every ``REPRICE`` steps), and V(k) what the
target's forward costs when it verifies k drafted tokens (V(0) = 1, a plain forward). V is measured too: the median
seconds of the latest verifications of k drafted tokens over a one-token forward's, once ``MEASURED`` (3) of them
were timed; before that the prior ``VERIFY_COST + k VERIFY_TOKEN_COST``, and for a length not measured yet the
straight line between the measured lengths around it, or past the longest one its V (optimistic: a chain drafts to
such a length and so measures it). A CPU's matrix kernels make V uneven (on 2 cores, 8 or 16 tokens cost less than
9 or 13; ``benchmarks/speed.py`` prints the table), and the rule drafts to the lengths that verify cheaply. Every
timing is a median (of the steps that drafted n tokens, for the line): noise on a shared machine is one-sided, and
a mean would carry a few slowed steps into every decision for the 256 steps they stay in the history.
Position k + 1, whose logits the drafter has computed, is drafted while some h >= 1 more positions add more tokens
than they cost at the drafter's rate:

    max over h >= 1 of (E_{k+h} - E_k) - lambda (V(k+h) - V(k) + (h - 1) c) > 0,

the forward that scored position k + 1 being spent already, and h tokens needing h - 1 more forwards to score the
positions between them; whether to score the position after the last one (one more forward) is decided before
that forward, by the classes it may find there (:meth:`CertifiedSchedule.may_extend`). The first position's logits
(k = 0) are the drafter's catching up with the context, spent too; but where drafting pays no more than plain
decoding (lambda <= 1) a step that drafts nothing sends the drafter into the back-off below, which saves that
forward at the next steps, and there the first token is charged c more, to pay for it. (Before session 18 it was
charged always: when drafting pays, a step that drafts nothing runs the drafter again at the next step.) The skipped
steps save the step's fixed cost F too, but charging it there (session 21, the draft head over Spec-Bench) made a
young history's k=auto back off where the head pays: writing 0.91 [0.86, 0.96] of k=1, 0.993 over all prompts,
against 0.97 [0.88, 1.07] and 1.004 charging c alone, the rest of the code the same.
Charging every drafted token a forward, as before session 15, ran the draft head's second forward at nearly every
step for a position it drafted at 8 steps in 460.

lambda being the tokens per target forward of the latest chain steps (their costs modelled as above; at least 1,
plain decoding's rate). This is the condition for maximising the long-run rate (total tokens / total cost, a
renewal-reward ratio) with lambda the rate the policy reaches, as in Dinkelbach's method for fractional programs:
comparing with the step's own E_k / C_k instead stops long chains too early (after many sure tokens that ratio
exceeds what the drafter reaches on average). Position k + 1 survives with S_{k+1} = S_k alpha (its class's rate)
and the positions after it, whose class is not known yet, with the classes' rates weighed by their shares of the
latest positions (:meth:`CertifiedSchedule.alpha_mean`). Looking ahead (h > 1)
matters because the first drafted token carries the verification's fixed cost (V(1) - 1) and V is uneven: a chain
that opens on an uncertified token may still pay over its certified ones. For a drafter far from the target the
rates below certification are small and the chain ends at the first uncertified position (the paper's rule); for a
close, cheap one it runs on past the positions certified nearly to eps_hat and stops at the ones far below. A
drafter without a distribution has no certificates; it may name each position's class itself, below
``CERTIFIED``, with the token it would draft there (``guess``): the n-gram drafter's is the size of the match behind
the token less one (:class:`~specert.drafters.NGramDrafter`: on Spec-Bench a token behind a match of 1 token was the
target's 19% of the time, of 3 tokens 72-76%), and its chain stops by the same rule on those classes' measured
rates, its stops judged like any other. One that names none has every position in class 0.

A chain can be *settled*: one token whatever its class, every class paying at the first position and knowing the
class worth less than measuring it (:meth:`CertifiedSchedule.settled`; the class decides only whether to score a
second position, and that may pay at a rare class by less than measuring every step costs). The draft head's is,
on 2 CPU cores: its positions' acceptance (0.2-0.3) pays for a verification that costs about a plain forward, not
for a second token's once V(2) is measured. Then the chain measures one step in ``SAMPLE`` (8): the drafter's
certificate, the position's class and the KL after it (0.5-0.6 ms of a 47 ms step, timed inside decoding, which
left k=auto about 2% behind a chain of one making the same decisions); the other steps draft one token unmeasured,
while this generation's first positions pay for it (:meth:`CertifiedSchedule.alpha_first`: whether a token was
accepted is known at every step, its class only where measured; session 21: on a translation the draft head was
accepted at 2-4% of the steps, where the history's classes said 0.2-0.3, and a class rate learnt at one step in 8
drafted at 45 of 46 steps). It is priced one step in ``SETTLED_REPRICE`` (32): only its rates moving can unsettle
it.

The guarantee audit counts, at verified certified positions that were measured (every position of a certified
tree, the certified ones of a chain): ``held`` (KL <= the eps_hat the width was chosen with), ``held_covered`` (of
those, the target's greedy token was among the candidates: must equal ``held``) and ``exceeded`` (KL > eps_hat:
the estimate was wrong there); and a chain's positions reached and accepted by class.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from specert.certificates import drafter_certificate, top1_certificates
from specert.divergence import kl_near
from specert.tensors import argmax


class Schedule:
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
        drafter computed it with its logits (a compiled step: :mod:`specert.static_cache`; the draft head: from its
        small logits), ``guess`` (class, token) of a frontier of one position of a drafter without a distribution:
        the token it would draft there and the class of its evidence, 0 .. ``CERTIFIED`` - 1 (:mod:`~specert.drafters`'
        n-grams: the match size behind it)."""
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
        return {}


# NOTE: the prior of the verification cost V(n) until it is measured (module docstring): on 2 CPU cores a target
# forward that verifies n >= 1 drafted tokens costs about VERIFY_COST + n * VERIFY_TOKEN_COST forwards of one token
# (embedded model, models.linear's layout; relative to one token, forwards of 2 tokens took 0.98-1.00, 4: 1.25-1.34,
# 5: 1.49-1.63, 8: 1.89-2.07, 9: 2.40-2.55, three prompts); benchmarks/speed.py prints the table. On a GPU both are
# near 0.
VERIFY_COST = 0.8
VERIFY_TOKEN_COST = 0.19
MEASURED = 3  # verifications of n drafted tokens timed before V(n) is theirs instead of the prior
KEEP = 256  # steps a length's V is kept after its timings left the latest steps (CertifiedSchedule.verify_costs)
NEAR = 5  # V(n)'s one-token forward: the median of the latest NEAR before each verification (verify_costs)

# Each class's acceptance rate weighs its chain position j positions ago (of that class) by (1 - 1 / RECENT)^j: about
# its latest RECENT positions count, so the rates follow the text being generated (a translation is drafted worse
# than code) instead of everything the drafter ever drafted. Per class, not over all: uncertified positions are
# rare with a close drafter, and a window over all positions would leave them a few samples and the estimate its
# prior of 1/2.
RECENT = 256
# A chain position's class: how many of the KL quantiles LEVELS * quantile its D_q(1) exceeds (module docstring); the
# last level is eps_hat's, so class len(LEVELS) = CERTIFIED is the certified positions.
LEVELS = (0.25, 0.5, 1.0)
CERTIFIED = len(LEVELS)
SPREAD = 8  # sum of (n - mean n)^2 over the timed steps before a line's slope is fitted to them (costs)
# A chain's prices (F, c), V and lambda are recomputed at a generation's first step and every REPRICE steps after,
# at every step while fewer than PRICED steps were timed: medians and a line over the latest 256 steps, they move
# little from one step to the next, and computing them took 0.2-0.3 ms a step, 0.6-0.8% of a draft head's step.
# A settled chain (below) prices one step in SETTLED_REPRICE: only its rates moving can unsettle it, and its pricing
# (the four classes' stopping and scoring rules besides) took 0.25% of the draft head's decoding at one step in 8.
REPRICE = 8
SETTLED_REPRICE = 32
PRICED = 64
# Within a generation a class's rate is (accepted here + PRIOR alpha) / (reached here + PRIOR), alpha the history's:
# the history weighs as PRIOR positions of this generation (CertifiedSchedule.alpha). Session 17, ngram:3 on
# Spec-Bench side by side: k=auto 1.129x plain greedy against 1.108x with the history's rates alone (78 prompts),
# 1.221x against 1.183x (16 prompts of extraction, translation, summarization, rag); 1.149x against 1.158x (26).
PRIOR = 16
# A settled chain (one token whatever its class: CertifiedSchedule.settled) measures one step in SAMPLE: the draft
# head's certificate and the KL after it took 0.5-0.6 ms of a 47 ms step that made a chain of one's decisions
# (0.85 ms timed with the rest of observe's measuring: 0.45% of its decoding at one step in 4).
SAMPLE = 8
# What measuring a chain's step costs, in one-token target forwards: the drafter's certificate and the KL after the
# step, 0.5-0.6 ms of the draft head's 47 ms step (session 18), against a one-token forward of 31-36 ms on these 2
# cores. A chain is settled when knowing its first position's class is worth less (CertifiedSchedule.settled).
MEASURE_COST = 0.015
# A chain is not settled before its classes' rates rest on this many measured chain positions (the decayed counts of
# all classes together): until then the rates are mostly their prior, and measuring every step is how they are learnt.
SETTLE_AFTER = 32


def _line(x, y, w) -> tuple[float, float]:
    """The least-squares line y = a + b x through points of weights w, (a, b), for x that varies (np.polyfit's
    answer; in plain Python, as a handful of points costs numpy more in overhead than in arithmetic)."""
    total = sum(w)
    mx, my = sum(wi * xi for wi, xi in zip(w, x)) / total, sum(wi * yi for wi, yi in zip(w, y)) / total
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    b = sxy / sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    return my - b * mx, b


def _medians(pairs) -> dict:
    """{key: (median of its values, how many)} for (key, value) pairs. The timings are medians, not means: noise on
    a shared machine is one-sided (a preempted forward is slower, never faster), and a few slowed steps must not
    move an estimate for as long as they stay in the history."""
    groups = defaultdict(list)
    for key, value in pairs:
        groups[key].append(value)
    return {key: (statistics.median(values), len(values)) for key, values in groups.items()}


def verify_cost(drafted: int) -> float:
    """A verifying forward's cost in forwards of one token (1 when nothing was drafted)."""
    return VERIFY_COST + VERIFY_TOKEN_COST * drafted if drafted else 1.0


class FixedSchedule(Schedule):
    def __init__(self, widths: list[int]):
        self.schedule = list(widths)
        self.max_depth = len(widths)
        self.budget = int(sum(np.cumprod(widths)))

    def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
        return [self.schedule[depth]] * frontier


class HeuristicSchedule(Schedule):
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 draft tokens after a step whose drafts were
    all accepted, -1 (not below 1) otherwise."""

    LIMIT = 32  # transformers lets the chain grow without bound; cap it so that it fits any context

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


@dataclass
class History:
    """What the certified schedules measured about one drafter, carried from one generation to the next (kept by the
    drafter: a server learns its drafter once, not per request)."""

    kls: deque = field(default_factory=lambda: deque(maxlen=512))  # KL(p || q) at the latest verified positions
    reached: list = field(default_factory=lambda: [0.0] * (CERTIFIED + 1))  # chain positions reached, per class
    accepted: list = field(default_factory=lambda: [0.0] * (CERTIFIED + 1))  # ... and accepted; both decayed (RECENT)
    # per class, the chain positions reached, all decayed together (the classes' shares of the latest RECENT)
    shares: list = field(default_factory=lambda: [0.0] * (CERTIFIED + 1))
    steps: deque = field(default_factory=lambda: deque(maxlen=256))  # (drafted, seconds outside the target's
    # forward, seconds of the target's forward) of the latest steps
    yields: deque = field(default_factory=lambda: deque(maxlen=64))  # (drafted, emitted) of the latest chain steps
    verified: dict = field(default_factory=dict)  # n -> (V(n) as last measured, `timed` then) (verify_costs)
    timed: int = 0  # the steps timed, ever


class CertifiedSchedule(Schedule):
    """Widths from the drafter-side certificate against an online estimate of the drafter's KL (module docstring)."""

    def __init__(self, max_depth: int = 16, max_width: int = 1, budget: int | None = None, quantile: float = 0.9,
                 cost: float | None = None, history: History | None = None):
        if not 0 < quantile <= 1:
            raise ValueError(f"the KL quantile must be in (0, 1], got {quantile}")
        if cost is not None and not cost >= 0:
            raise ValueError(f"the drafted token's cost relative to a target forward must be >= 0, got {cost}")
        self.max_depth, self.max_width, self.quantile, self.fixed_cost = max_depth, max_width, quantile, cost
        self.budget = budget if budget is not None else int(sum(max_width**d for d in range(1, max_depth + 1)))
        self.history = history if history is not None else History()
        self.eps = self._estimate()
        self.counts = dict(held=0, held_covered=0, exceeded=0, certified_reached=0, certified_accepted=0,
                           uncertified_reached=0, uncertified_accepted=0)  # this generation's (the audit)
        self._drafted: list[int] = []  # this step's chain: the class of each position
        self._survive = 1.0  # the chance the chain's latest drafted token survives
        self._stop: tuple[int, int] | None = None  # where it stopped: (its class, the drafter's token there)
        self._backoff = self._skip = 0  # steps to decode without the drafter after it drafted nothing
        self._probe = self._probed = False  # the step after a skip may probe (a chain without a distribution)
        self._asked = False  # whether a chain's drafter asked for this step's first width (it had something to draft)
        self._costs, self._rate = (0.0, 0.0), 1.0  # (F, c) and lambda for this step
        self._verify: list[float] | None = None  # V(0 .. max_depth) for this step
        self._lambda, self._priced = 1.0, 0  # the latest lambda computed, and the steps since the first pricing
        self._here = [[0, 0] for _ in range(CERTIFIED + 1)]  # this generation's chain positions: reached, accepted
        self._first = [0, 0]  # this generation's first chain positions, at every step: reached, accepted
        self._settled = False  # whether the chain is one token whatever its class (settled), as last priced
        self._measured = True  # whether this step's chain is measured (its classes, the KLs after it)
        self._count = 0  # the steps observed: a settled chain measures one in SAMPLE

    @property
    def certifies(self) -> bool:
        """Whether the drafter should compute its certificate at this step: not at a settled chain's unmeasured
        steps (:meth:`settled`)."""
        return not self._settled or self._count % SAMPLE == 0

    @property
    def eps_hat(self) -> float:
        """The estimate of the drafter's KL(p || q): the ``quantile`` of the latest measured KLs (0 before any)."""
        return self.eps[-1]

    def _estimate(self) -> list[float]:
        """eps(l q) for l in LEVELS: the class thresholds, eps_hat last (all 0 before any KL was measured)."""
        kls = self.history.kls
        if not kls:
            return [0.0] * len(LEVELS)
        xs, last = sorted(kls), len(kls) - 1  # numpy's default (linear) quantiles, 3x faster on 512 values
        out = []
        for level in LEVELS:
            at = level * self.quantile * last
            lo = int(at)
            hi = min(lo + 1, last)
            out.append(xs[lo] + (xs[hi] - xs[lo]) * (at - lo))
        return out

    def level(self, certificate: float) -> int:
        """A position's class: how many of the thresholds ``eps`` its D_q(1) exceeds (``CERTIFIED``: all)."""
        return sum(certificate > e for e in self.eps)

    def costs(self) -> tuple[float, float]:
        """(F, c) in one-token target forwards: a step's fixed cost besides the target's forward (the drafter
        catching up with the context, the bookkeeping) and a drafted token's marginal cost of drafting (its
        verification is in :meth:`verify_costs`). Given c: (0, c). Measured: the least-squares line seconds = a + b n
        through the median seconds of the latest steps that drafted n tokens (weighed by their number) once n
        spreads enough for a slope (``SPREAD``), else the median seconds per token of the steps that drafted; 0
        before any measurement."""
        if self.fixed_cost is not None:
            return 0.0, self.fixed_cost
        steps, one = self.history.steps, self.forward_seconds()
        n = [drafted for drafted, _, _ in steps]
        if not one or not any(n):
            return 0.0, 0.0
        # the line's slope is as sure as sum (n - mean n)^2 is large; else one ratio, over the steps that drafted
        # (the seconds of steps that drafted nothing are no drafted token's)
        a, b, mean = -1.0, 0.0, sum(n) / len(n)
        if sum((x - mean) ** 2 for x in n) > SPREAD:
            groups = _medians((drafted, seconds) for drafted, seconds, _ in steps)
            a, b = _line(list(groups), [m for m, _ in groups.values()], [k for _, k in groups.values()])
        if not (a >= 0 and b > 0):
            a, b = 0.0, statistics.median(seconds / drafted for drafted, seconds, _ in steps if drafted)
        return a / one, b / one

    def verify_costs(self) -> list[float]:
        """V(0), V(1), ... V(max_depth): the target's forward, in one-token forwards, when it verifies that many drafted
        tokens. V(0) = 1; V(n) is the median over the latest verifications of n drafted tokens, once
        ``MEASURED`` of them were timed, of each one's seconds over the one-token forward's at the time: the
        median of the latest ``NEAR`` verifications of at most one drafted token before it (each over its prior
        cost), or :meth:`forward_seconds` before any; the prior ``VERIFY_COST + n VERIFY_TOKEN_COST`` before any
        length was measured. Each against the forwards of its own time, not one median over the history: a
        forward's seconds grow with the context (31 ms at 60 tokens, 36 ms at 750), and a length drafted rarely,
        its few timings from one prompt, read cheaper than it is against forwards of longer prompts (the draft
        head's V(2) read 0.91 of a one-token forward against a V(1) of 0.99, where both at the same context
        measure 1.12-1.14 and 1.04-1.05, and its chain drafted a second token at half its steps). A length not
        measured yet is priced by the measured ones: on the straight line between the two around it, and past
        the longest at the longest one's V, the least a longer verification can cost. Optimistic on purpose: a
        chain drafts to a length it prices cheaply and so measures it, but never to one it overprices (a line
        through short lengths, whose per-token cost on a CPU is twice the long ones', kept k=auto's chains short
        for a whole run, or not, depending on its first steps). A length measured once and drafted too rarely since
        to stay in the latest steps keeps its last measured V (``History.verified``) for ``KEEP`` more steps,
        rather than being priced optimistically again at once: the draft head's chain drafted a second token at 13
        of 714 steps, never accepted, three every 256 steps, to measure again that it does not pay. Not for good: a
        chain that no longer drafts a length cannot correct its V (int4's settled at one token a step on a V(2) of
        1.96 one-token forwards in session 21; session 22's logs read 1.17-1.34), so it is measured again one
        window and ``KEEP`` steps after it last was."""
        table, one = [verify_cost(n) for n in range(self.max_depth + 1)], self.forward_seconds()
        if not one:
            return table
        ratios, near = [], deque(maxlen=NEAR)  # each verification over the one-token forwards just before it
        for n, _, seconds in self.history.steps:
            if n <= 1:
                near.append(seconds / verify_cost(n))
            if 0 < n < len(table):
                ratios.append((n, seconds / (statistics.median(near) if near else one)))
        known, now = self.history.verified, self.history.timed
        known.update((n, (v, now)) for n, (v, count) in _medians(ratios).items() if count >= MEASURED)
        for n in [n for n, (_, at) in known.items() if now - at > KEEP]:
            del known[n]
        measured = sorted(n for n in known if n < len(table))
        if not measured:
            return table
        costs = [1.0] + [known[n][0] for n in measured]  # V(0) = 1: a plain forward
        return [1.0] + np.interp(range(1, len(table)), [0] + measured, costs).tolist()

    def forward_seconds(self) -> float | None:
        """A one-token target forward's seconds, the unit of every cost: the median of the latest verifications of
        at most one drafted token (which cost about one forward) once ``MEASURED`` were timed, else of all of them,
        each over its prior cost; None before any."""
        short = [s / verify_cost(n) for n, _, s in self.history.steps if n <= 1]
        scaled = short if len(short) >= MEASURED else [s / verify_cost(n) for n, _, s in self.history.steps]
        return statistics.median(scaled) if scaled else None

    def timed(self, draft_seconds, verify_seconds, drafted):
        self.history.steps.append((drafted, draft_seconds, verify_seconds))
        self.history.timed += 1

    def alpha(self, level: int) -> float:
        """The measured acceptance rate of chain positions of a class. From the history (decayed counts):
        a = (accepted + 1) / (reached + 2) for the certified ones; (accepted + 2 u) / (reached + 2) below, u the rate
        of all uncertified positions measured the same way, toward which a class seen little is drawn (uncertified
        positions are rare with a close drafter: split three ways, each class would start from 1/2 for its first
        dozens of positions). Within a generation, (accepted here + ``PRIOR`` a) / (reached here + ``PRIOR``)."""
        h = self.history
        if level == CERTIFIED:
            a = (h.accepted[level] + 1) / (h.reached[level] + 2)
        else:
            pooled = (sum(h.accepted[:CERTIFIED]) + 1) / (sum(h.reached[:CERTIFIED]) + 2)
            a = (h.accepted[level] + 2 * pooled) / (h.reached[level] + 2)
        reached, accepted = self._here[level]
        return (accepted + PRIOR * a) / (reached + PRIOR)

    def alpha_first(self) -> float:
        """The acceptance rate of this generation's first chain positions, counted at every step, measured or not
        (drafted, or judged by the target's bonus token where the chain stopped), with the classes' mean rate
        (:meth:`alpha_mean`) counting as ``PRIOR`` positions: (accepted + PRIOR a) / (reached + PRIOR). A settled
        chain, which knows its position's class at one step in ``SAMPLE`` only, decides its other steps by it."""
        reached, accepted = self._first
        return (accepted + PRIOR * self.alpha_mean()) / (reached + PRIOR)

    def shares(self) -> list[float]:
        """P(l): each class's share of the latest chain positions (``History.shares``, one position of each
        besides). Not the counts behind the rates: those decay per class, so a frequent class's saturate at RECENT
        while the rare ones grow on and weigh more than they occur."""
        shares = self.history.shares
        total = sum(shares) + len(shares)
        return [(x + 1) / total for x in shares]

    def alpha_mean(self) -> float:
        """The acceptance rate a chain position expects before its class is known: sum over classes l of P(l)
        alpha_l. (The pooled counts, over-weighing the rare classes, read about 0.93 for 0.97 with ``compiled:int4``,
        and the lookahead then stopped chains before the lengths that verify dearly, 85 of 225 after 2 tokens.)"""
        return sum(p * self.alpha(level) for level, p in enumerate(self.shares()))

    def rate(self, fixed: float, c: float) -> float:
        """lambda: tokens per target forward over the latest steps, each step's cost modelled as F + V(n) + n c; at
        least 1, the rate of plain decoding, which is always available."""
        steps, v = self.history.yields, self._verify or self.verify_costs()
        cost = sum(fixed + v[min(n, len(v) - 1)] + n * c for n, _ in steps)
        return max(1.0, sum(emitted for _, emitted in steps) / cost) if steps else 1.0

    def net(self, depth: int, survive: float, ahead: float | None = None) -> float:
        """What drafting on at ``depth`` (its token surviving with probability ``survive``, its logits computed)
        earns at best, over the chain lengths k + h (h = 1 .. what is left), the positions after this one expected
        at the mean rate: max over h of the tokens they add less lambda times their cost, the verification's and
        the h - 1 drafter forwards that score the positions between them (h from the first: module docstring).
        ``ahead``: :meth:`alpha_mean`, when the caller has it."""
        c, v = self._costs[1], self._verify or self.verify_costs()
        ahead = self.alpha_mean() if ahead is None else ahead
        # the forward that scored this position is spent, unless it is the first one and drafting nothing would
        # send the drafter into the back-off (lambda <= 1: observe), which saves it at the next steps
        spent = depth > 0 or self._rate > 1
        best, gain, term = -math.inf, 0.0, survive
        for h in range(1, min(max(1, self.depths - depth), len(v) - 1 - depth) + 1):
            gain, term = gain + term, term * ahead
            # verifying k + h drafted tokens instead of k (from 0: a plain forward becomes a verification)
            best = max(best, gain - self._rate * (v[depth + h] - v[depth] + (h - spent) * c))
        return best

    def pays(self, depth: int, survive: float) -> bool:
        """Whether drafting on at ``depth`` pays for some chain length: :meth:`net` > 0."""
        return self.net(depth, survive) > 0

    def _chain_width(self, depth: int, q: torch.Tensor | None, certificate: float | None,
                     guess: tuple[int, int] | None) -> int:
        if depth == 0:
            self._drafted, self._stop, self._survive, self._asked = [], None, 1.0, True
            every = SETTLED_REPRICE if self._settled else REPRICE
            priced = self._priced % every == 0 or len(self.history.steps) < PRICED
            if priced:
                self._costs, self._verify = self.costs(), self.verify_costs()
                self._lambda = self.rate(*self._costs)
            self._priced += 1
            # near the end of the generation there is no long run to earn lambda in: what the chain does not
            # draft, plain decoding (rate 1) must produce. Near: no further than the latest chains' longest (a
            # draft head's are one token; with max_depth instead, its last 16 tokens were a fifth of its steps,
            # drafted at rate 1 and backing off after every stop)
            longest = max((n for n, _ in self.history.yields), default=self.max_depth)
            rate = self._lambda if self.room > longest else 1.0
            if priced or rate != self._rate:
                self._rate = rate
                self._settled = self.settled()
            # A drafter that names neither a distribution nor its token leaves nothing for the target to judge
            # where the chain stops, so a low acceptance estimate would stop it for good: the first step after a
            # skip drafts one token anyway.
            self._probed = q is None and guess is None and self._probe
            self._measured = q is None or certificate is not None or not self._settled or self._count % SAMPLE == 0
            if not self._measured:  # one token whatever its class (not worth a certificate, nor the KL after it),
                if self.pays(0, self.alpha_first()):  # while this generation's first positions pay for it
                    self._drafted.append(None)
                    return 1
                self._stop = (None, int(argmax(q)))  # (not measured: q is given) for the bonus token to judge
                return 0
        if certificate is None and q is not None and self.eps_hat > 0:
            certificate = float(top1_certificates(q[None]))
        if guess is not None:
            level = guess[0]
        else:
            level = self.level(certificate) if q is not None and self.eps_hat > 0 else 0
        survive = self._survive * self.alpha(level)
        probe = depth == 0 and self._probed
        if self._measuring(q is not None) and not probe and not self.pays(depth, survive):
            # what it would have drafted, for verification to judge (a drafter that names neither: not known)
            self._stop = (level, int(argmax(q))) if q is not None else guess
            return 0
        self._survive = survive
        self._drafted.append(level)
        return 1

    def may_extend(self, depth):
        """A chain scores its last token (runs the drafter on it for the logits of the position after it) only if
        that pays on average. Scoring costs lambda c whatever it finds; the class found there decides whether the
        chain drafts on, and one that does not pay leaves the chain where it was. With P(l) the share of class l
        among the latest chain positions (:meth:`shares`) and N_l = :meth:`net` there at that class's rate, it
        scores when

            sum over l of P(l) max(N_l, 0) > lambda c.

        Scoring whenever some class would pay (the rule before session 15) ran the draft head's forward at nearly
        every step for a second position it drafted at 8 steps in 460: 5-11% slower than a chain of one."""
        if self.max_width > 1 or not self._measuring(True):
            return True
        return self._measured and self._scores(depth, self._survive)

    def _scoring(self, depth: int, survive: float) -> float:
        """What scoring the position at ``depth`` earns less what it costs, in tokens (:meth:`may_extend`'s rule,
        for a chain whose latest token survives with probability ``survive``): sum over l of P(l) max(N_l, 0) -
        lambda c."""
        ahead = self.alpha_mean()
        value = sum(p * max(self.net(depth, survive * self.alpha(level), ahead), 0.0)
                    for level, p in enumerate(self.shares()))
        return value - self._rate * self._costs[1]

    def _scores(self, depth: int, survive: float) -> bool:
        """:meth:`may_extend`'s rule: :meth:`_scoring` > 0."""
        return self._scoring(depth, survive) > 0

    def settled(self) -> bool:
        """Whether the chain is one token whatever its first position's class: every class pays there, and what
        knowing the class is worth does not pay for knowing it. The class decides only whether to score a second
        position (:meth:`may_extend`); over the classes l at the first position, that is worth

            W = sum over l of P(l) max(S_l, 0)   tokens a step,

        S_l = :meth:`_scoring` at the second position after a first of class l, against ``MEASURE_COST`` forwards
        (lambda ``MEASURE_COST`` tokens) to measure every step. Settled when W <= lambda ``MEASURE_COST``: then the
        chain measures one step in ``SAMPLE`` (the drafter's certificate, the position's class and the KL after
        it: the rates, eps_hat and the audit learn from that sample) and drafts one token at the others while
        :meth:`alpha_first` pays for it. Checked at each pricing and when the rate changes (near the end of a
        generation).

        Before session 21 a chain was settled only where no class scored (W = 0): the draft head's class-1
        positions in extraction, accepted 65-94% of the time, would score a second position, drafted at 0-9 steps
        per generation, and the chain measured every step for it (k=auto over k=1 on 10 extraction prompts:
        0.995).

        Not before the classes' rates rest on ``SETTLE_AFTER`` measured chain positions: a settled chain learns
        them at one step in ``SAMPLE``, so one that settled on their prior of 1/2 learnt them 8 times slower than a
        chain that measures every step (``int4`` from an empty history, logged in session 22 on session 21's code:
        settled at 14 of its first 17 steps, a token a step, its first positions accepted 14 times in 15)."""
        if self.max_width > 1 or self.eps_hat == 0 or self.depths < 2 or sum(self.history.reached) < SETTLE_AFTER:
            return False
        classes = range(CERTIFIED + 1)
        if not all(self.pays(0, self.alpha(level)) for level in classes):
            return False
        worth = sum(p * max(self._scoring(1, self.alpha(level)), 0.0) for level, p in zip(classes, self.shares()))
        return worth <= self._rate * MEASURE_COST

    def _measuring(self, distribution: bool) -> bool:
        """Whether the chain's classes are measured: once eps_hat is (a drafter with a distribution; before, every
        position would count as uncertified), from the first step for a drafter without one (every position
        uncertified: alpha_u is its acceptance rate, and the stopping rule runs on it alone)."""
        return self.eps_hat > 0 or not distribution

    def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
        if self.max_width == 1 and frontier == 1:
            return [self._chain_width(depth, None if logits is None else logits[0], certificate, guess)
                    if budget_left else 0]
        if logits is None:  # no distribution to certify: a plain tree level
            return [1] * frontier if budget_left >= frontier else [0] * frontier
        out = []
        for i in range(frontier):
            m = 0
            for width in range(1, min(self.max_width, logits.shape[-1] - 1) + 1):
                if width == 1 and certificate is not None:  # the drafter's own D_q(1) of its only position
                    d = certificate
                else:
                    d = float(drafter_certificate(logits[i], width))
                if d > self.eps_hat:
                    m = width
                    break
            m = m if m <= budget_left else 0  # a cut width would void the guarantee: no children instead
            budget_left -= m
            out.append(m)
        return out

    def should_draft(self) -> bool:
        if self._skip:
            self._skip -= 1
            self._probe = not self._skip
            return False
        return True

    def observe(self, tree, target_logits, path):
        # A drafter that drafted nothing (or only a probe that was rejected) is not even run for a while: 1, 2, 4,
        # ... 32 steps, until it drafts again; not a chain's drafter whose drafting pays (lambda > 1): this one
        # position did not. Nor a chain's drafter that had nothing to draft (an n-gram drafter finding no match, at
        # half the steps of Spec-Bench's stem prompts): the rule judged nothing, and looking again costs it next to
        # nothing. (6 stem prompts after a short warm-up, rate 1 for lack of history and then near each
        # generation's end: the drafter ran at 201 of 248 steps; at 238 of 241, every step with room for a draft,
        # since.) A tree has no lambda to say its drafting pays: an empty step is its only brake (tree=auto:16 with
        # ngram:3, which drafts width-1 trees 8 deep at every match without it: 0.92x plain greedy against 0.99).
        drafted_any = bool(tree.tokens) and not (self._probed and not path)
        asked, self._asked = self._asked, False
        self._probe = self._probed = False
        measured, self._measured = self._measured, True
        self._count += 1
        if asked or drafted_any or self.max_width > 1:
            self._backoff = 0 if drafted_any or self._rate > 1 else min(max(1, 2 * self._backoff), 32)
            self._skip = self._backoff
        h, counts = self.history, self.counts
        if self.max_width == 1:
            h.yields.append((len(tree.tokens), len(path) + 1))
        drafted, self._drafted = self._drafted, []  # a chain's positions: their classes
        stop, self._stop = self._stop, None
        if self.max_width == 1 and (tree.tokens or stop is not None):  # the first position, drafted or judged
            self._first[0] += 1
            self._first[1] += bool(path) if tree.tokens else int(argmax(target_logits[0])) == stop[1]
        # the chain's acceptance by class (before eps_hat moves)
        if self.max_width == 1 and self._measuring(tree.logits is not None):
            seen = [(level, j < len(path)) for j, level in enumerate(drafted[: len(tree.tokens)])
                    if j <= len(path) and level is not None]
            if stop is not None and stop[0] is not None and len(path) == len(drafted):  # the bonus token judges it
                level, token = stop
                seen.append((level, int(argmax(target_logits[len(path)])) == token))
            for level, accepted in seen:
                name = "certified" if level == CERTIFIED else "uncertified"
                h.shares = [x * (1 - 1 / RECENT) for x in h.shares]
                h.shares[level] += 1
                h.reached[level] *= 1 - 1 / RECENT  # older positions of the class weigh less (RECENT)
                h.accepted[level] *= 1 - 1 / RECENT
                h.reached[level] += 1
                h.accepted[level] += accepted
                self._here[level][0] += 1
                self._here[level][1] += accepted
                counts[f"{name}_reached"] += 1
                counts[f"{name}_accepted"] += accepted
        positions = [p for p in [-1] + path if tree.children(p) and tree.expanded[p + 1]]
        if not positions or tree.logits is None or not measured:
            return
        rows = [p + 1 for p in positions]
        # a chain's rows are consecutive: a view, not a copy of them
        rows = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
        divergence = kl_near(target_logits[rows], tree.logits[rows], self.eps_hat).tolist()
        greedy = argmax(target_logits[rows]).tolist()
        for j, (pos, d, x0) in enumerate(zip(positions, divergence, greedy)):
            if self.max_width == 1 and not (j < len(drafted) and drafted[j] == CERTIFIED):
                continue  # a chain position drafted past the certified ones: no guarantee to audit
            if d <= self.eps_hat:
                counts["held"] += 1
                counts["held_covered"] += int(x0 in [tree.tokens[c] for c in tree.children(pos)])
            else:
                counts["exceeded"] += 1
        h.kls.extend(d for d in divergence if math.isfinite(d))
        self.eps = self._estimate()

    def audit(self):
        return dict(self.counts)


def make_schedule(k: int | str | None = None, tree: str | list[int] | None = None, quantile: float = 0.9,
                  history: History | None = None) -> Schedule:
    """A schedule from the ``k`` / ``tree`` options (see the module docstring); default: a chain of 4. A certified
    schedule starts from ``history`` (what earlier generations measured about the drafter) when given."""
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
            return CertifiedSchedule(max_depth=8, max_width=8, budget=n or 16, quantile=quantile, history=history)
        return CertifiedSchedule(max_depth=n or 16, max_width=1, quantile=quantile, history=history)
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
