"""The draft-shape schedules (specert.decoding.schedules), driven as the decoder drives them: fixed and heuristic
shapes, the certified tree's widths, and the certified chain's cost model, classes, stopping rule (against a
brute-force reference), scoring rule, settled chains, back-off and audit."""

import dataclasses
from collections import deque

import numpy as np
import pytest
import torch

from specert.decoding.drafts import DraftTree
from specert.decoding.loop import generate
from specert.decoding.schedules import (
    CERTIFIED,
    CertifiedSchedule,
    FixedSchedule,
    HeuristicSchedule,
    History,
    ScheduleSettings,
    make_schedule,
)
from specert.decoding.schedules.chain import drafting_gain, scoring_gain, settling_worth
from specert.decoding.schedules.classes import certificate_class
from specert.decoding.schedules.costs import drafting_rate, forward_seconds, step_costs, verify_costs, verify_prior
from specert.drafters.model import ModelDrafter, layer_skip_view, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.theory.certificates import drafter_certificate, top1_certificates
from tiny import tiny_model

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42]
DEFAULT = ScheduleSettings()
# The stopping rule's tests fix the verification costs (the measured ones are the machine's):
CHEAP = ScheduleSettings(verify_fixed=1.4, verify_per_token=0.01)  # any draft 1.4 forwards, plus 0.01 per token
# ... or make them more than a doubtful token can pay: 1 + 0.35 forwards per drafted token. (A chain position whose
# logits the drafter has computed costs only its verification: at 0.01 per token, any token pays for it.)
DEAR = ScheduleSettings(verify_fixed=1.0, verify_per_token=0.35)
SURE = torch.tensor([6.0, 0, 0, 0, 0, 0, 0, 0])  # [V] drafter logits certified at any eps_hat used here
UNSURE = torch.tensor([0.0, 0, 1.0, 0.9, 0, 0, 0, 0])  # two near-tied tokens: would draft token 2


def history(eps=None, kls=None, reached=None, accepted=None, shares=None, yields=()) -> History:
    """A drafter's history as earlier generations left it. ``eps``: KLs that all equal it, so that every class
    threshold, eps_hat too, is ``eps``."""
    h = History(yields=deque(yields, maxlen=64))
    h.kls.extend([eps] * 100 if eps is not None else kls if kls is not None else [])
    for name, counts in (("reached", reached), ("accepted", accepted), ("shares", shares)):
        if counts is not None:
            setattr(h, name, [float(x) for x in counts])
    return h


def chain_widths(schedule, positions, **kw):
    """The widths a chain schedule gives drafter logits ``positions`` (each ``[V]``) depth by depth, up to the first
    0 (where the chain stops)."""
    out = []
    for depth, q in enumerate(positions):
        out.append(schedule.widths(depth, q[None], 1, 100, **kw)[0])
        if not out[-1]:
            break
    return out


def chain_length(schedule, q=SURE[None], limit=None):
    """How long a chain of positions like ``q [1, V]`` the schedule drafts."""
    depth, limit = 0, limit or schedule.max_depth
    while depth < limit and schedule.widths(depth, q, 1, 100)[0]:
        depth += 1
    return depth


def rule(s, rate, token, verify=None, shares=None):
    """The inputs of the chain's rules (specert.decoding.schedules.chain) at lambda ``rate`` and c ``token``:
    schedule ``s``'s class rates and shares (``shares`` instead if given), V the prior unless given."""
    rates = [s.rates.alpha(level) for level in range(CERTIFIED + 1)]
    if shares is not None:
        total = sum(shares) + len(shares)
        shares = [(x + 1) / total for x in shares]
    else:
        shares = s.rates.shares()
    ahead = sum(p * a for p, a in zip(shares, rates))
    verify = verify or [verify_prior(n, s.settings) for n in range(s.max_depth + 1)]
    return dict(alphas=rates, shares=shares, ahead=ahead, rate=rate, token=token, verify=verify, depths=s.depths)


def gain(depth, survive, inputs):
    """G of the stopping rule at these rule inputs (:func:`rule`)."""
    keys = ("ahead", "rate", "token", "verify", "depths")
    return drafting_gain(depth, survive, *(inputs[k] for k in keys))


# -- shapes -------------------------------------------------------------------------------------------------------


class TestMakeSchedule:
    def test_widths(self):
        assert make_schedule(3).schedule == [1, 1, 1]
        assert make_schedule(tree="4,2,1").schedule == [4, 2, 1]
        assert make_schedule(tree="4,2,1").max_nodes == 4 + 8 + 8
        for kw, msg in [(dict(k=0), ">= 1"), (dict(tree="4,x"), "widths per depth"), (dict(tree="2,0"), ">= 1"),
                        (dict(k=2, tree="2"), "either k"), (dict(k="auto:x"), "whole number"),
                        (dict(tree="heuristic"), "drafts chains"), (dict(k="fast"), "auto")]:
            with pytest.raises(ValueError, match=msg):
                make_schedule(**kw)

    def test_certified_shapes_and_settings(self):
        chain, tree = make_schedule(k="auto", settings=CHEAP), make_schedule(tree="auto:12")
        assert (chain.max_depth, chain.max_width, chain.settings) == (16, 1, CHEAP)
        assert (tree.max_depth, tree.max_width, tree.max_nodes, tree.settings) == (8, 8, 12, DEFAULT)
        with pytest.raises(ValueError, match="quantile"):
            CertifiedSchedule(quantile=0.0)
        with pytest.raises(ValueError, match="cost"):
            CertifiedSchedule(cost=-1.0)

    def test_settings_name_the_bad_field(self):
        for kw, msg in [(dict(verify_per_token=-0.1), "verify_per_token"), (dict(sample_every=0), "sample_every"),
                        (dict(levels=(0.5, 1.0)), "levels"), (dict(levels=(0.5, 0.25, 1.0)), "levels"),
                        (dict(levels=(0.25, 0.5, 0.9)), "levels")]:
            with pytest.raises(ValueError, match=msg):
                ScheduleSettings(**kw)
        assert ScheduleSettings(levels=[1.0, 1.0, 1.0]).levels == (1.0, 1.0, 1.0)


def test_heuristic_schedule_grows_and_shrinks(target):
    sched = HeuristicSchedule(5)
    out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=40, k="heuristic")
    assert max(out.drafted) > 5  # all accepted: +2 per step
    tree = type("T", (), {"tokens": [1, 2, 3]})()
    sched.observe(tree, None, [0])
    assert sched.max_depth == 4


# -- the certified schedules in the decoder ------------------------------------------------------------------------


@pytest.mark.slow  # 10-90 s per model on 2 loaded cores: 12 generations
def test_certified_schedule_guarantee_and_economy(target):
    """The auto schedules: wherever KL <= eps_hat the target's greedy token was covered (D_q soundness, live);
    a drafter close to the target and cheap drafts full chains, an unrelated one drafts less than a fixed chain."""
    close = ModelDrafter(target.model, "self")
    far = model_drafter(tiny_model("llama" if "llama" in target.name else "qwen3", seed=9, layers=1), target)
    for drafter in (close, far, ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")):
        for shape in (dict(k="auto"), dict(tree="auto:12")):
            out = generate(target, PROMPT, drafter, max_new_tokens=40, **shape)
            assert out.audit["held_covered"] == out.audit["held"]
    # as if a target forward took 10^6 s and verifying a token were nearly free (a GPU): drafting pays at any length
    close.history.steps.clear()
    for _ in range(DEFAULT.min_timings):
        close.history.record_step(0, 0.0, 10.0**6)
    close.history.verified.update({n: (0.8 + 0.01 * n, close.history.timed) for n in range(1, 7)})
    full = generate(target, PROMPT, close, max_new_tokens=40, k="auto:6")
    assert min(full.drafted[:-1]) == 6
    auto = generate(target, PROMPT, far, max_new_tokens=40, k="auto:8")
    fixed = generate(target, PROMPT, far, max_new_tokens=40, k=8)
    assert sum(auto.verified) / auto.steps < sum(fixed.verified) / fixed.steps


def test_a_chain_does_not_score_a_last_token_whose_successor_cannot_pay(target):
    """may_extend: the certified chain asks the drafter for the logits after its latest token only if the position
    there pays for that forward on average over the classes it may find (it stops there otherwise, whatever its
    class): the drafter's forward is skipped, and the output stays the target's greedy output."""
    assert CertifiedSchedule(max_depth=8, cost=0.3).may_extend(1)  # nothing measured yet: it drafts, to learn
    low = CertifiedSchedule(max_depth=8, cost=0.3, history=history(0.01, reached=[50, 0, 0, 50],
                                                                   accepted=[5, 0, 0, 10]))  # right 1 time in 5
    assert not low.chain.scoring(1, 0.2) > 0  # after a token surviving with 0.2: scoring cannot pay
    high = CertifiedSchedule(max_depth=8, cost=0.3, history=history(0.01, reached=[50, 0, 0, 50],
                                                                    accepted=[5, 0, 0, 49], shares=[0, 0, 0, 50]))
    assert high.widths(0, SURE[None], 1, 100) == [1] and high.may_extend(1)  # certified ones nearly always right
    assert CertifiedSchedule(max_width=8).may_extend(3) and FixedSchedule([1, 1]).may_extend(1)  # trees, fixed

    class Stop(FixedSchedule):  # a chain of 3 that refuses to look past its first token
        def may_extend(self, depth):
            return depth < 1

    drafter = ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")
    runs = []
    drafter._run = lambda tokens, _run=drafter._run: runs.append(len(tokens)) or _run(tokens)
    tree = drafter.propose(PROMPT, Stop([1, 1, 1]))
    assert len(tree.tokens) == 1 and len(runs) == 1  # the context's forward only: the drafted token not scored


# -- the certified tree --------------------------------------------------------------------------------------------


def test_certified_tree_never_cuts_a_width_to_fit_the_budget():
    """A position certified only at width m gets m children or none: fewer than m would void the guarantee (a
    benchmark run's audit caught 1 position of 364 where the budget had cut a certified 4 to 1)."""
    flat = torch.tensor([[3.0, 2.9, 2.8, 2.7, 0.0, -1.0, -2.0, -3.0]])  # four near-equal tokens: certified at m = 4
    peaked = torch.tensor([[9.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])  # certified at m = 1
    s = CertifiedSchedule(max_depth=3, max_width=8, budget=16, history=history(0.05))
    m = next(w for w in range(1, 8) if float(drafter_certificate(flat[0], w)) > s.eps_hat)
    assert m > 1
    both = torch.cat([peaked, flat])
    assert s.widths(1, both, 2, budget_left=m + 1) == [1, m]
    assert s.widths(1, both, 2, budget_left=m) == [1, 0]  # m no longer fits after the first: no children
    assert s.widths(1, flat, 1, budget_left=m - 1) == [0]


# -- the cost model ------------------------------------------------------------------------------------------------


def test_the_drafting_cost_is_measured_from_the_step_timings():
    """c, a drafted token's cost, is measured over a one-token forward: one drafted length, all of a step's seconds
    per token; lengths that vary, the slope of a line, whose intercept is F."""
    s = CertifiedSchedule(max_depth=8, settings=DEAR)
    s.timed(0.2, 0.5 * verify_prior(8, DEAR), 8)  # a one-token forward: 0.5 s
    assert step_costs(s.history, DEAR)[1] == pytest.approx(0.2 / 8 / 0.5)  # one length: all of it per token
    s = CertifiedSchedule(max_depth=8, settings=DEAR)
    for n in (2, 4, 12):  # lengths that vary: 0.1 s per step and 0.0125 s per token
        s.timed(0.1 + 0.0125 * n, 0.5 * verify_prior(n, DEAR), n)
    assert step_costs(s.history, DEAR) == pytest.approx((0.1 / 0.5, 0.0125 / 0.5))
    assert step_costs(s.history, DEAR, token=0.3) == (0.0, 0.3)  # given c: F is 0


def test_the_drafting_cost_is_not_charged_with_steps_that_drafted_nothing():
    """c is the slope of a step's seconds against its drafted tokens: steps that drafted nothing (their seconds are
    the step's own) do not inflate it, whether the slope is fitted or, with too few drafting steps for one, a ratio
    over the steps that drafted."""
    s, one = CertifiedSchedule(), 0.5
    for n, seconds, count in ((0, 0.01, 35), (1, 0.012, 15)):
        for _ in range(count):
            s.timed(seconds, one, n)
    fixed, c = step_costs(s.history, DEFAULT)
    unit = forward_seconds(s.history, DEFAULT)  # about 0.5 s
    assert fixed == pytest.approx(0.01 / unit) and c == pytest.approx(0.002 / unit)
    s = CertifiedSchedule()
    for n, seconds, count in ((0, 0.01, 40), (1, 0.012, 3)):
        for _ in range(count):
            s.timed(seconds, one, n)
    unit = forward_seconds(s.history, DEFAULT)
    assert step_costs(s.history, DEFAULT) == pytest.approx((0.0, 0.012 / unit))  # (0.4 + 0.036) / 3 would be 12x


def test_a_burst_of_slowed_steps_does_not_move_the_measured_costs():
    """Timing noise on a shared machine is one-sided: a burst of steps slowed threefold by another process (8 of 68)
    leaves the unit, F, c and V where the steady steps put them (every timing is a median; the mean moved the unit
    by a third)."""
    one = 0.03  # a one-token forward's seconds
    s = CertifiedSchedule(max_depth=12)

    def step(n, slowed=1.0):  # drafting: 4 ms a step and 10 ms a token; verifying n: 0.8 + 0.05 n forwards
        s.timed(slowed * (0.004 + 0.01 * n), slowed * one * (0.8 + 0.05 * n), n)

    for n in (1, 4, 8, 12):
        for _ in range(15):
            step(n)
    unit, costs = forward_seconds(s.history, DEFAULT), step_costs(s.history, DEFAULT)
    verify = verify_costs(s.history, DEFAULT, 12)
    assert unit == pytest.approx(one * 0.85 / verify_prior(1, DEFAULT))
    assert costs == pytest.approx((0.004 / unit, 0.01 / unit))
    for n in (1, 1, 1, 12, 12, 12, 12, 12):
        step(n, slowed=3.0)
    assert forward_seconds(s.history, DEFAULT) == pytest.approx(unit)
    assert step_costs(s.history, DEFAULT) == pytest.approx(costs, rel=0.02)
    assert verify_costs(s.history, DEFAULT, 12) == pytest.approx(verify, rel=0.02)


def test_verification_costs_are_measured_against_the_forwards_of_their_time():
    """V(n) divides each verification's seconds by the one-token forwards just before it, not by one median over
    the history: a length drafted only in a short prompt (forwards of 30 ms) is not read cheaper than one token
    against the 36 ms forwards of the long prompts after it."""
    s = CertifiedSchedule(max_depth=4)
    one = verify_prior(1, DEFAULT)  # the prior's V(1), the unit's own measure
    for n, seconds, count in ((1, 0.030 * one, 20), (2, 0.030 * 1.1, 3), (1, 0.036 * one, 60)):
        for _ in range(count):
            s.timed(0.0, seconds, n)
    assert forward_seconds(s.history, DEFAULT) == pytest.approx(0.036)  # the history's median: the long prompts'
    assert verify_costs(s.history, DEFAULT, 4)[:3] == pytest.approx([1.0, one, 1.1])  # against it V(2) read 0.92


def test_certified_chain_drafts_to_lengths_that_verify_cheaply():
    """V(n), what the target's forward costs when it verifies n drafted tokens, is measured once ``min_timings``
    verifications of n were timed (a CPU's matrix kernels make it uneven): a sure chain that the prior runs to its
    end stops before lengths that verify dearly, and runs on through them to one that verifies cheaply. A length
    measured once keeps its V for ``keep_verified`` steps after its timings left the latest steps."""
    s = CertifiedSchedule(max_depth=8, cost=0.3, settings=CHEAP,
                          history=history(0.01, reached=[0, 0, 0, 100], accepted=[0, 0, 0, 98]))
    h, timings, keep = s.history, CHEAP.min_timings, CHEAP.keep_verified

    def measure(costs):  # V(n) for n = 1 .. 8 (or {n: V(n)}), each timed min_timings times; a forward takes 0.5 s
        h.steps.clear()
        h.verified.clear()
        for n, v in (costs if isinstance(costs, dict) else dict(enumerate(costs, 1))).items():
            h.steps.extend([(n, 0.0, 0.5 * v)] * timings)

    def v():
        return verify_costs(h, CHEAP, 8)

    prior = [verify_prior(n, CHEAP) for n in range(9)]
    assert v() == prior and chain_length(s) == 8  # the prior: near free
    dear = [prior[1], 1.45, 1.5, 5.0, 5.0, 5.0, 5.0, 5.1]  # verifying 4 tokens or more costs 5 forwards
    measure(dear)
    assert forward_seconds(h, CHEAP) == pytest.approx(0.5)  # from the verifications of one drafted token
    assert v() == pytest.approx([1.0] + dear)
    assert chain_length(s) == 3
    measure(dear[:6] + [2.0, 5.1])  # ... but 7 tokens verify in 2
    assert chain_length(s) == 7
    measure(dear[:3])  # too few timings of 4 drafted tokens and more: priced at the longest measured length's V,
    assert v()[4:] == pytest.approx([dear[2]] * 5) and chain_length(s) == 8  # so the chain drafts to them
    measure({1: prior[1], 2: 1.5, 8: 2.1})  # between measured lengths: the straight line
    assert v() == pytest.approx([1.0, prior[1], 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1])
    h.steps.clear()  # lengths timed before, none in the latest steps: each keeps its last measured V
    h.steps.extend([(1, 0.0, 0.5 * prior[1])] * timings)
    assert v() == pytest.approx([1.0, prior[1], 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1])
    h.steps.extend([(2, 0.0, 0.5 * 1.2)] * timings)  # timed again: its new V
    assert v()[:3] == pytest.approx([1.0, prior[1], 1.2])
    h.timed += keep  # keep_verified steps later, still timed in the latest steps: still theirs; the others kept
    assert v() == pytest.approx([1.0, prior[1], 1.2, 1.35, 1.5, 1.65, 1.8, 1.95, 2.1])
    h.timed += 1  # ... but not for good: gone from the latest steps, V(8) is measured again
    h.steps.clear()  # (one step more, and the timings of 1 and 2 drafted tokens still the latest)
    h.steps.extend([(1, 0.0, 0.5 * prior[1])] * timings + [(2, 0.0, 0.5 * 1.2)] * timings)
    assert v() == pytest.approx([1.0, prior[1]] + [1.2] * 7)
    h.verified.clear()
    h.steps.clear()
    assert v() == prior  # none measured: the prior


def test_certified_chain_drafts_past_lengths_it_has_not_measured_at_this_machines_rate():
    """The lengths not drafted yet are priced at the longest measured length's V (the least they can cost), not by
    the prior nor by a line through the short lengths: a sure chain runs on to them and so measures them. (On the
    embedded model k=auto stopped at 9 drafted tokens when the prior priced 10 and more above what 9 measured; a
    line through lengths 1-5, steeper per token than the long lengths on a CPU, kept int4's chains at a mean
    acceptance length of 3.8 for a whole run.)"""
    s = CertifiedSchedule(max_depth=12, cost=0.1, history=history(0.01, reached=[0, 0, 0, 100],
                                                                  accepted=[0, 0, 0, 99], yields=[(4, 5)] * 4))
    one = verify_prior(1, DEFAULT)  # V(1), the unit's own measure (a one-token forward taking 0.5 s)
    for n in range(1, 5):  # V(1 .. 4) measured: 0.05 per drafted token
        for _ in range(DEFAULT.min_timings):
            s.timed(0.0, 0.5 * (one + 0.05 * (n - 1)), n)
    assert verify_costs(s.history, DEFAULT, 12)[5:] == pytest.approx([one + 0.05 * 3] * 8)
    assert verify_prior(5, DEFAULT) - verify_costs(s.history, DEFAULT, 12)[4] > 0.5  # the prior: 0.6 forwards more
    assert chain_length(s) == 12


def test_lambda_is_the_latest_chains_tokens_per_forward():
    """lambda, the drafter's rate: tokens per target forward of the latest chain steps, each costing F + V(n) + n c;
    at least 1, plain decoding's rate. The chain prices with it, except near the end of the generation (the room
    left no more than the latest chains' longest), where plain decoding is the alternative."""
    prior = [verify_prior(n, CHEAP) for n in range(17)]
    assert drafting_rate([], prior, 0.0, 0.3) == 1.0  # nothing measured
    expected = 13 / (1.4 + 12 * (0.01 + 0.3))  # 13 tokens for 1.4 + 12 (0.01 + 0.3) = 5.12 forwards per step
    assert drafting_rate([(12, 13)] * 4, prior, 0.0, 0.3) == pytest.approx(expected)
    assert drafting_rate([(0, 1)] * 4, prior, 0.5, 0.3) == 1.0  # drafting nothing costs F more: plain is better
    s = CertifiedSchedule(max_depth=16, cost=0.3, settings=CHEAP, history=history(0.01, yields=[(12, 13)] * 4))
    s.widths(0, SURE[None], 1, 100)
    assert s.chain.rate == pytest.approx(expected) and s.chain.prices.rate == s.chain.rate > 2
    s.room = 3  # the generation's last tokens: no long run to earn lambda in
    s.widths(0, SURE[None], 1, 100)
    assert s.chain.rate == 1.0
    s.history.yields.extend([(2, 3)] * 64)  # ... but with chains of 2 tokens, 3 tokens are more than one step's
    s.widths(0, SURE[None], 1, 100)
    assert s.chain.rate == pytest.approx(drafting_rate(s.history.yields, prior, 0.0, 0.3)) and s.chain.rate > 1


def test_a_chain_reprices_every_few_steps():
    """A chain's prices (F, c, V, lambda) are recomputed at the first step of a generation, at every step while
    the history is short, and every ``reprice_every`` steps after: a drafter that turns dearer is priced so within
    that many steps, and between two pricings the prices stand."""
    one, every, short_history = 0.03, DEFAULT.reprice_every, DEFAULT.price_every_step_below
    h = History()
    for n in range(2 * short_history):
        h.record_step(n % 4, 0.002 + 0.001 * (n % 4), one)
    s = CertifiedSchedule(max_depth=4, history=h)
    s.widths(0, None, 1, 100)
    cheap = s.chain.prices.token
    assert cheap == pytest.approx(0.001 / one, rel=0.05)
    for n in range(256):  # ten times dearer
        s.timed(0.002 + 0.01 * (n % 4), one, n % 4)
    prices = []
    for _ in range(every):
        s.widths(0, None, 1, 100)
        prices.append(s.chain.prices.token)
    assert prices[0] == cheap and prices[-1] == pytest.approx(0.01 / one, rel=0.05)
    assert prices.count(prices[-1]) == 1  # repriced once, at the last of these steps
    short = CertifiedSchedule(max_depth=4)  # a short history: every step
    for _ in range(8):
        short.timed(0.003, one, 1)
    short.widths(0, None, 1, 100)
    for _ in range(16):
        short.timed(0.03, one, 1)
    short.widths(0, None, 1, 100)
    assert short.chain.prices.token == pytest.approx(0.03 / forward_seconds(short.history, DEFAULT))


# -- the certified chain's stopping rule ---------------------------------------------------------------------------


def reference_chain_length(classes, alphas, ahead, rate, fixed, token, verify, depths) -> int:
    """Brute force of the stopping rule: how many positions a chain of the given ``classes`` drafts. With the
    positions known so far at their class's rate and the ones after at ``ahead``, E_n (expected tokens) and C_n
    (cost) of every chain length n are written out, and position k + 1 is drafted iff some length n > k has

        (E_n - E_k) - rate (C_n - C_k - s c) > 0,   s = 1 if k > 0 or rate > 1 (the spent forward), else 0."""

    def survive(j, k):  # S_j, the classes of positions 1 .. k + 1 known
        return float(np.prod([alphas[classes[i]] if i <= k else ahead for i in range(j)]))

    def tokens(n, k):  # E_n
        return 1 + sum(survive(j, k) for j in range(1, n + 1))

    def cost(n):  # C_n
        return fixed + verify[n] + n * token

    k = 0
    while k < depths:
        spent = 1 if k > 0 or rate > 1 else 0
        margins = [(tokens(n, k) - tokens(k, k)) - rate * (cost(n) - cost(k) - spent * token)
                   for n in range(k + 1, depths + 1)]
        if max(margins) <= 0:
            break
        k += 1
    return k


def test_drafting_gain_is_the_brute_force_margin(rng):
    """G_k (drafting_gain) is the best margin over the chain lengths n > k of the brute force's E and C."""
    for _ in range(300):
        depths = int(rng.integers(1, 17))
        verify = [1.0] + sorted(rng.uniform(0.5, 4.0, depths)).copy()
        depth = int(rng.integers(0, depths))
        survive, ahead, rate, token = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(1, 4), rng.uniform(0, 0.5)
        spent = 1 if depth > 0 or rate > 1 else 0
        prefix = [1.0] + [survive * ahead**i for i in range(depths)]  # E's terms from position k + 1
        best = max(sum(prefix[1 : n - depth + 1]) - rate * (verify[n] - verify[depth] + (n - depth - spent) * token)
                   for n in range(depth + 1, depths + 1))
        assert drafting_gain(depth, survive, ahead, rate, token, verify, depths) == pytest.approx(best)


def test_the_chains_stopping_rule_agrees_with_the_brute_force(rng):
    """On random class rates, shares, verification costs, c and lambda, the certified chain drafts as many positions
    as the brute-force reference says it should, its positions' classes given by the drafter's certificates."""
    thresholds_kls = np.linspace(0.0, 2.0, 101)  # the class thresholds: 0.45, 0.9, 1.8
    certificates = [0.1, 0.6, 1.2, 5.0]  # one certificate in each class, 0 .. CERTIFIED
    q = torch.tensor([[5.0, 0, 0, 0]])
    for _ in range(200):
        max_depth = int(rng.integers(1, 13))
        settings = ScheduleSettings(verify_fixed=float(rng.uniform(0, 1.5)),
                                    verify_per_token=float(rng.uniform(0, 0.5)))
        reached = rng.uniform(0, 300, CERTIFIED + 1)
        n = rng.integers(0, max_depth + 1, int(rng.integers(0, 20)))
        h = history(kls=thresholds_kls, reached=reached, accepted=reached * rng.uniform(0, 1, CERTIFIED + 1),
                    shares=rng.uniform(0, 300, CERTIFIED + 1),
                    yields=[(int(d), int(rng.integers(1, d + 2))) for d in n])
        if rng.uniform() < 0.5:  # V measured, uneven
            for length in range(1, max_depth + 1):
                for _ in range(settings.min_timings):
                    h.record_step(length, 0.0, 0.03 * float(rng.uniform(0.8, 3.0)))
        token = float(rng.uniform(0, 0.6))
        s = CertifiedSchedule(max_depth=max_depth, cost=token, history=h, settings=settings)
        verify = verify_costs(h, settings, max_depth)
        alphas = [s.rates.alpha(level) for level in range(CERTIFIED + 1)]
        ahead = s.rates.alpha_mean()
        cost = sum(verify[min(d, max_depth)] + d * token for d, _ in h.yields)
        rate = max(1.0, sum(e for _, e in h.yields) / cost) if h.yields else 1.0
        classes = [int(c) for c in rng.integers(0, CERTIFIED + 1, max_depth)]
        expected = reference_chain_length(classes, alphas, ahead, rate, 0.0, token, verify, max_depth)
        drafted = 0
        while drafted < max_depth and s.widths(drafted, q, 1, 100, certificate=certificates[classes[drafted]])[0]:
            drafted += 1
        assert s.chain.rate == pytest.approx(rate)
        assert drafted == expected, (classes, alphas, ahead, rate, token, verify)


def test_certified_chain_runs_past_the_certificate_only_while_it_pays():
    """With uncertified drafts measured mostly rejected the chain ends at the first uncertified position (the
    paper's rule); measured mostly accepted with a cheap drafter it runs on; a drafter as costly as the target
    cannot pay (a surely accepted token for a forward's cost) and drafts nothing."""
    mid = float(drafter_certificate(UNSURE, 1) + drafter_certificate(SURE, 1)) / 2  # SURE certified, UNSURE not
    chain = [SURE, SURE, UNSURE, SURE, UNSURE]

    def schedule(reached, accepted, cost):
        return CertifiedSchedule(max_depth=8, cost=cost, settings=DEAR,
                                 history=history(mid, reached=reached, accepted=accepted))

    assert chain_widths(schedule([10, 0, 0, 50], [2, 0, 0, 50], 0.3), chain) == [1, 1, 0]
    assert chain_widths(schedule([50, 0, 0, 50], [49, 0, 0, 50], 0.3), chain) == [1, 1, 1, 1, 1]
    assert chain_widths(schedule([50, 0, 0, 50], [49, 0, 0, 50], 1.0), chain) == [0]
    shipped_head = schedule([600, 0, 0, 0], [188, 0, 0, 0], 0.1)  # the shipped head, measured
    assert shipped_head.widths(0, UNSURE[None], 1, 100) == [0]  # right 31% of the time: cannot pay its verification


def test_certified_chain_drafts_while_its_tokens_beat_the_drafters_rate():
    """The stopping rule: draft on while the tokens the next positions add beat lambda times their cost; the first
    draft pays for the verification, so the rule looks past it."""
    s = CertifiedSchedule(max_depth=16, cost=0.3, settings=CHEAP)
    fixed_cost = CHEAP.verify_fixed + CHEAP.verify_per_token - 1  # what the first draft adds to the forward: 0.41
    # the drafter's forward that scored the first token is spent, unless drafting nothing sends the drafter into
    # the back-off (lambda <= 1), which saves it later
    at = {rate: rule(s, rate, 0.3) for rate in (1.0, 1.5, 1.8, 2.6)}
    assert at[1.0]["ahead"] == 0.5  # nothing measured: every class at 1/2
    assert gain(0, 0.7, at[1.8]) < 0  # a token surviving with 0.7 is worth 0.7 < 1.8 * 0.41; ones at 1/2, never
    assert gain(0, 0.7, at[1.5]) == pytest.approx(0.7 - 1.5 * fixed_cost)  # the forward not charged: 0.7 > 0.615
    # with the back-off: worth 0.7 < 0.71 alone, but with the one after it 1.05 > 0.42 + 2 * 0.3
    assert 0 < gain(0, 0.7, at[1.0]) == pytest.approx(1.05 - (fixed_cost + CHEAP.verify_per_token + 0.6))
    # later in the chain a position's logits are computed already: its token costs its verification, and every
    # token after it a drafter forward more
    assert gain(5, 0.7, at[2.6]) == pytest.approx(0.7 - 2.6 * CHEAP.verify_per_token)
    # positions after it at a mean rate of 0.96: the first draft carries the verification (0.8 < 2 * 0.41), but
    # with those after it it pays; at 1/2 it does not
    sure = CertifiedSchedule(max_depth=16, cost=0.3, settings=CHEAP,
                             history=history(reached=[0, 0, 0, 100], accepted=[0, 0, 0, 98], shares=[0, 0, 0, 100]))
    assert 0.8 < 2.0 * fixed_cost and gain(0, 0.8, rule(sure, 2.0, 0.3)) > 0
    half = CertifiedSchedule(max_depth=16, cost=0.3, settings=CHEAP,
                             history=history(reached=[0, 0, 0, 100], accepted=[0, 0, 0, 50], shares=[0, 0, 0, 100]))
    assert gain(0, 0.8, rule(half, 2.0, 0.3)) < 0


# -- classes and their rates ---------------------------------------------------------------------------------------


def test_certified_chain_classes_positions_by_the_kl_level_their_certificate_reaches():
    """A chain position's class is how many of the KL quantiles ``levels`` * quantile its D_q(1) exceeds, each class
    with its own measured acceptance rate: the chain runs on through a position certified nearly to eps_hat (its
    class accepted 97% of the time) and stops at one far below it (30%), where two classes, certified or not, stop
    at both; the verified step counts each position in its class; a class seen little is drawn toward the rate of
    all uncertified positions."""
    kls = np.linspace(0.0, 2.0, 101)  # KL quantiles 0.45, 0.9, 1.8 at 0.225, 0.45, 0.9
    h = history(kls=kls, reached=[100, 100, 100, 100], accepted=[30, 70, 97, 99])
    s = CertifiedSchedule(max_depth=8, cost=0.3, settings=DEAR, history=h)
    assert s.eps == pytest.approx([0.45, 0.9, 1.8]) and s.eps_hat == pytest.approx(1.8)
    sure, near, low, far = (torch.tensor([x, 0, 0, 0, 0, 0, 0, 0.0]) for x in (7.0, 5.0, 3.5, 1.0))
    classes = [certificate_class(float(drafter_certificate(q, 1)), s.eps) for q in (sure, near, low, far)]
    assert classes == [CERTIFIED, 2, 1, 0]
    assert chain_widths(s, [sure, near, sure, far, sure]) == [1, 1, 1, 0]
    two_classes = dataclasses.replace(DEAR, levels=(1.0,) * CERTIFIED)  # every uncertified position in class 0
    two = CertifiedSchedule(max_depth=8, cost=0.3, settings=two_classes, history=h)
    assert chain_widths(two, [sure, near, sure, far, sure]) == [1, 0]
    tree = DraftTree([0, 0, 0], [-1, 0, 1], torch.stack([sure, near, sure, far]), [True] * 4)
    target = torch.zeros(4, 8)
    target[:, 0] = 5.0  # every drafted token accepted, and the far position's token 0 is the target's too
    s.observe(tree, target, [0, 1, 2])
    g = 1 - 1 / DEFAULT.recent_positions  # each position seen discounts the older ones of its class
    # sure twice, near once, the far stop judged by the target's bonus token (accepted), class 1 not seen
    assert h.reached == pytest.approx([100 * g + 1, 100, 100 * g + 1, 100 * g * g + g + 1])
    assert h.accepted == pytest.approx([30 * g + 1, 70, 97 * g + 1, 99 * g * g + g + 1])
    # the classes' shares decay together: the latest position weighs 1, the one before g, ...
    assert h.shares == pytest.approx([1, 0, g**2, g**3 + g])
    # a class seen little starts from the rate of all uncertified positions, not from 1/2 (a new generation)
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[40, 0, 0, 100], accepted=[36, 0, 0, 99]))
    assert s.rates.alpha(2) == pytest.approx(37 / 42) and s.rates.alpha(0) == pytest.approx((36 + 2 * 37 / 42) / 42)
    assert s.rates.alpha(CERTIFIED) == pytest.approx(100 / 102)


def test_certified_chain_learns_from_where_it_stopped():
    """After a fully accepted chain, the target's bonus token says whether the token the drafter would have drafted
    where the chain stopped was right: the stop is measured without drafting it."""
    mid = float(drafter_certificate(UNSURE, 1) + drafter_certificate(SURE, 1)) / 2
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history(mid, reached=[4, 0, 0, 10], accepted=[0, 0, 0, 10]))
    assert chain_widths(s, [SURE, UNSURE]) == [1, 0]
    tree = DraftTree([0], [-1], torch.stack([SURE, UNSURE]), [True, True])
    target = torch.zeros(2, 8)
    target[0, 0] = target[1, 2] = 5.0  # accepts the drafted 0, and its greedy token after it is the drafter's 2
    s.observe(tree, target, [0])
    g = 1 - 1 / DEFAULT.recent_positions  # each position seen discounts the older ones of its class
    assert s.history.reached == pytest.approx([4 * g + 1, 0, 0, 10 * g + 1])
    assert s.history.accepted == pytest.approx([0 * g + 1, 0, 0, 10 * g + 1])
    assert s.audit()["uncertified_accepted"] == 1 and s.audit()["certified_accepted"] == 1


def test_certified_chain_follows_the_text_being_generated():
    """The acceptance rates weigh recent positions most (``recent_positions``): after a long run of accepted
    uncertified drafts, a run of rejected ones brings the measured rate down to where the chain stops at them."""
    s = CertifiedSchedule(max_depth=8, cost=0.3, settings=CHEAP,  # nothing is certified: KLs far above D_q(1)
                          history=history(100.0, reached=[60, 0, 0, 0], accepted=[57, 0, 0, 0]))  # 95% accepted
    assert s.widths(0, UNSURE[None], 1, 100) == [1]
    target = torch.zeros(2, 8)
    target[0, 3] = 5.0  # the target wants 3: the drafted 2 is rejected
    for _ in range(DEFAULT.recent_positions // 2):
        width = s.widths(0, UNSURE[None], 1, 100)[0]  # rejected, or judged where it stopped
        tree = DraftTree([2] * width, [-1] * width, UNSURE[None].repeat(1 + width, 1), [True] + [False] * width)
        s.observe(tree, target[: 1 + width], [])
    assert s.eps_hat > float(drafter_certificate(UNSURE, 1))  # (still nothing certified)
    assert s.rates.alpha(0) < 0.7
    assert s.widths(0, UNSURE[None], 1, 100) == [0]


def test_certified_chain_follows_the_text_within_a_generation():
    """Within a generation a class's rate is this generation's positions with the history's rate weighing
    ``prior_positions`` positions: a drafter whose class-2 tokens the history accepted 90% of the time stops
    drafting them after a few rejections in this text, where the history alone (256 positions) would still have it
    draft; the next generation starts again from the history."""
    h = History(reached=[10.0, 10, 200, 0], accepted=[1.0, 3, 180, 0])
    s = CertifiedSchedule(max_depth=8, cost=0.3, settings=CHEAP, history=h)
    target = torch.zeros(2, 8)
    target[:, 3] = 5.0  # the target wants 3: the drafter's 5 is rejected
    rejected = 0
    while s.widths(0, None, 1, 100, guess=(2, 5)) == [1] and rejected < 30:
        s.observe(DraftTree([5], [-1], None, [False, False]), target, [])
        rejected += 1
    fresh = CertifiedSchedule(max_depth=8, cost=0.3, settings=CHEAP, history=h)  # the next generation
    assert 3 <= rejected <= 8 and fresh.rates.alpha(2) > 0.85  # the history's rate (256 positions) barely moved
    prior = DEFAULT.prior_positions
    assert s.rates.alpha(2) == pytest.approx(prior * fresh.rates.alpha(2) / (rejected + prior))
    assert fresh.widths(0, None, 1, 100, guess=(2, 5)) == [1]


def test_a_chain_scores_the_next_position_only_if_the_classes_found_there_pay_on_average():
    """may_extend's rule weighs each class by how often chain positions fall in it: a class that would pay but is
    rarely found does not pay for a drafter forward at every step (the draft head ran a second forward at nearly
    every step for a position it drafted at 8 steps in 460), and one found often does. A position whose class is
    not known yet expects the classes' rates weighed by their shares."""
    s = CertifiedSchedule(max_depth=8, history=history(reached=[200, 15, 0, 0], accepted=[60, 13, 0, 0]))
    rare, often = rule(s, 1.2, 0.1, shares=[200, 15, 0, 0]), rule(s, 1.2, 0.1, shares=[20, 150, 0, 0])
    alpha = rare["alphas"]
    assert gain(1, 0.5 * alpha[1], rare) > 0 > gain(1, 0.5 * alpha[0], rare)  # class 1 pays, class 0 not
    assert scoring_gain(1, 0.5, **rare) < 0  # class 1 is found at 1 position in 14
    assert scoring_gain(1, 0.5, **often) > 0  # the same rates, class 1 found at 7 positions in 8
    assert scoring_gain(1, 0.5, **rule(s, 1.2, 0.0, shares=[200, 15, 0, 0])) > 0  # a free forward: whenever one pays
    # the classes' rates weighed by their shares, not by the counts behind the rates (which decay per class: the
    # frequent class's saturate near recent_positions)
    h = history(reached=[100, 100, 100, 250], accepted=[50, 90, 95, 249], shares=[8, 8, 8, 226])
    rates = CertifiedSchedule(history=h).rates
    alphas = [rates.alpha(level) for level in range(CERTIFIED + 1)]
    assert rates.alpha_mean() == pytest.approx((9 * (alphas[0] + alphas[1] + alphas[2]) + 227 * alphas[3]) / 254)
    assert rates.alpha_mean() > 0.96 > 0.88 > (sum(h.accepted) + 1) / (sum(h.reached) + 2)


# -- drafters without a distribution, and the back-off -------------------------------------------------------------


def ngram_step(s, accepted, limit=8):
    """One decoding step of a chain drafter without a distribution that names no class (its tokens 5): (whether the
    drafter ran, its widths); the target accepts ``accepted`` of the drafted tokens."""
    if not s.should_draft():  # plain decoding: the decoder neither asks nor tells the schedule
        return False, []
    widths = []
    while len(widths) < limit and s.widths(len(widths), None, 1, 100)[0]:
        widths.append(1)
    tokens = [5] * len(widths)
    s.observe(DraftTree(tokens, list(range(-1, len(tokens) - 1)), None, [False] * (1 + len(tokens))),
              torch.zeros(1 + len(tokens), 8), list(range(min(accepted, len(tokens)))))
    return True, widths


def test_certified_chain_without_a_distribution_stops_on_its_measured_acceptance():
    """A drafter without a distribution (n-grams) gets no certificates: its chain is measured from its first step,
    every position uncertified, and stops by the rule on that rate."""
    s = CertifiedSchedule(max_depth=8, cost=0.3)
    assert s.widths(0, None, 1, 100) == [1]  # nothing measured: it drafts, to learn
    target = torch.zeros(2, 8)
    target[0, 2] = 5.0  # rejects the drafted token
    s.observe(DraftTree([5], [-1], None, [False] * 2), target, [])
    assert s.history.reached == [1.0, 0, 0, 0] and s.history.accepted == [0.0, 0, 0, 0]
    tenth = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[60, 0, 0, 0], accepted=[6, 0, 0, 0]))
    assert tenth.widths(0, None, 1, 100) == [0]  # right 1 time in 10: cannot pay
    most = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[60, 0, 0, 0], accepted=[57, 0, 0, 0]))
    assert chain_length(most, None) == 8  # right 19 times in 20: a long chain


def test_a_chain_without_a_distribution_probes_after_backing_off():
    """An n-gram chain whose estimate says drafting cannot pay drafts nothing, backs off, and then drafts one token
    anyway (a probe: no stop token is judged for it, so without probes a low estimate would stop it for good). A
    rejected probe doubles the back-off; an accepted one raises the estimate and ends it."""
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[60, 0, 0, 0], accepted=[3, 0, 0, 0]))
    assert ngram_step(s, 0) == (True, [])  # the rule stops it (right 1 time in 20): nothing drafted
    assert ngram_step(s, 0) == (False, [])  # backing off one step
    assert ngram_step(s, 0) == (True, [1])  # the probe: one token, rejected
    assert [ngram_step(s, 0)[0] for _ in range(3)] == [False, False, True]  # backing off two steps, probing again
    before = s.rates.alpha(0)
    assert [ngram_step(s, 1)[0] for _ in range(4)] == [False, False, False, False]  # four, then the probe is accepted
    assert ngram_step(s, 1) == (True, [1])
    assert s.rates.alpha(0) > before and s.backoff.length == 0 and s.should_draft()


def test_a_drafter_with_nothing_to_draft_is_not_backed_off():
    """A chain's back-off follows the rule's stops only: a drafter that had nothing to draft (an n-gram drafter
    finding no match, which never asks for widths) is looked at again at the next step, even where lambda is 1 (the
    end of a generation); one whose first position the rule stopped there is not run for a step. A tree backs off
    after any empty step."""
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[60, 0, 0, 0], accepted=[3, 0, 0, 0]))
    nothing = DraftTree([], [], None, [False])
    for _ in range(3):
        assert s.should_draft()
        s.observe(nothing, torch.zeros(1, 8), [])  # no match: widths never asked
    assert s.chain.rate == 1 and s.backoff.length == 0
    assert s.should_draft() and s.widths(0, None, 1, 100, guess=(0, 5)) == [0]  # the rule stops it
    s.observe(nothing, torch.zeros(1, 8), [])
    assert not s.should_draft() and s.should_draft()  # one step without it
    tree = CertifiedSchedule(max_width=8)  # a tree has no lambda to say its drafting pays: an empty step backs off
    tree.observe(nothing, torch.zeros(1, 8), [])
    assert not tree.should_draft() and tree.should_draft()


def test_ngram_chain_names_its_match_sizes_and_its_stops_are_judged():
    """An n-gram chain hands the schedule, with each token, the class of the match behind it (its size - 1, at most
    CERTIFIED - 1): a looked-up token behind a 1-token suffix, then copied tokens behind 2 and 3 tokens that agree.
    Where a certified chain stops, the target's bonus token judges the token it would have drafted there, so the
    class's acceptance is measured without drafting it (and a low estimate is revised without probes)."""
    context = [7, 8, 4, 5, 6, 1, 4]  # (1, 4) never occurred before; (4) did, followed by 5, 6, 1
    drafter = NGramDrafter(3)
    seen = []

    class Record(FixedSchedule):
        def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
            seen.append(guess)
            return super().widths(depth, logits, frontier, budget_left, certificate, guess)

    assert drafter.propose(context, Record([1] * 3)).tokens == [5, 6, 1]
    assert seen == [(0, 5), (1, 6), (2, 1)]
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history(reached=[60, 0, 0, 0], accepted=[3, 0, 0, 0]))
    tree = drafter.propose(context, s)
    assert tree.tokens == []  # class 0, right 1 time in 20: not worth drafting
    target = torch.zeros(1, 10)
    target[0, 5] = 1.0  # the target's token there is the one the chain stopped at
    s.observe(tree, target, [])
    decay = 1 - 1 / DEFAULT.recent_positions
    assert s.history.reached[0] == pytest.approx(60 * decay + 1)
    assert s.history.accepted[0] == pytest.approx(3 * decay + 1)


# -- settled chains ------------------------------------------------------------------------------------------------


def settled_history(**kw) -> History:
    """A drafter every class of which is right 6 times in 10, whose verifications of 1 and 2 tokens were timed at
    1.35 and 1.7 one-token forwards (V(1) and V(2) of DEAR), and whose latest chains drafted one token and had it
    accepted: lambda = 2 / (1.35 + 0.1) with c = 0.1, so a first token pays at 0.6 and a second not."""
    h = history(0.5, reached=[100] * 4, accepted=[60] * 4, yields=[(1, 2)] * 64, **kw)
    for _ in range(DEFAULT.price_every_step_below):
        h.record_step(1, 0.0, 1.35)
        h.record_step(2, 0.0, 1.7)
    return h


def test_a_settled_chain_measures_one_step_in_sample(monkeypatch):
    """A chain that is one token whatever its class (every class pays at the first position, none would score a
    second: the draft head's on this machine) asks neither the drafter's certificate nor the KL after it, except at
    one step in ``sample_every``: the rates, eps_hat and the audit learn from that sample, and every step drafts one
    token. It is priced one step in ``settled_reprice_every``. With a class that does not pay, the chain is not
    settled and measures every step."""
    computed = []  # certificates the schedule computed itself (the drafter gave none)
    monkeypatch.setattr("specert.decoding.schedules.chain.top1_certificates",
                        lambda q, _f=top1_certificates: computed.append(1) or _f(q))
    gen = torch.Generator().manual_seed(0)
    s = CertifiedSchedule(max_depth=8, cost=0.1, settings=DEAR, history=settled_history())
    every = DEAR.sample_every
    measured = []
    for step in range(3 * every):
        asked = s.certifies
        q = torch.randn(1, 16, generator=gen)
        assert s.widths(0, q, 1, 100) == [1] and not s.may_extend(1)
        kls, reached = len(s.history.kls), sum(s.history.shares)
        s.observe(DraftTree([int(q.argmax())], [-1], torch.cat([q, q]), [True, False]),
                  torch.randn(2, 16, generator=gen), [0])
        measured.append((asked, len(s.history.kls) > kls, sum(s.history.shares) > reached))
        assert step == 0 or s.chain.settled
    assert measured == [(step % every == 0,) * 3 for step in range(3 * every)]
    assert len(computed) == 3  # the measured steps' only
    prices = []
    for _ in range(DEAR.settled_reprice_every):
        assert s.widths(0, torch.randn(1, 16, generator=gen), 1, 100) == [1] and s.chain.settled
        prices.append(s.chain.prices)
    assert sum(a is not b for a, b in zip(prices, prices[1:])) == 1  # priced once in settled_reprice_every steps
    s.history.reached[0], s.history.accepted[0] = 100.0, 10.0  # class 0 right 1 time in 10: it stops there
    for _ in range(DEAR.settled_reprice_every):  # (unsettled at the next pricing)
        s.widths(0, torch.randn(1, 16, generator=gen), 1, 100)
        if not s.chain.settled:
            break
    for _ in range(every):
        assert s.certifies
        s.widths(0, torch.randn(1, 16, generator=gen), 1, 100)
        assert not s.chain.settled and s.chain.step.measured
        s.observe(DraftTree([], [], torch.randn(1, 16, generator=gen), [True]), torch.randn(1, 16, generator=gen), [])


def test_a_settled_chain_stops_where_this_generations_first_positions_stop_paying():
    """A settled chain knows its position's class at one step in ``sample_every``, but whether its token was
    accepted at every step: this generation's first positions (alpha_first) decide its other steps. Rejected at
    every step (the draft head on a translation: accepted 2-4% of the time), it stops drafting at the unmeasured
    steps, and the target's bonus token judges the token where it stopped."""
    gen = torch.Generator().manual_seed(0)
    s = CertifiedSchedule(max_depth=8, cost=0.1, settings=DEAR, history=settled_history())
    every = DEAR.sample_every

    def step(agree: bool) -> int:
        q = torch.randn(1, 16, generator=gen)
        width = s.widths(0, q, 1, 100)[0]
        target = torch.randn(1 + width, 16, generator=gen)
        target[0, int(q.argmax())] = 10.0 if agree else -10.0  # the target's greedy token is the drafter's, or not
        tokens = [int(q.argmax())] * width
        s.observe(DraftTree(tokens, [-1] * width, torch.cat([q] * (1 + width)), [True] + [False] * width), target,
                  [0] if agree and width else [])
        return width

    widths = [step(agree=False) for _ in range(3 * every)]
    assert s.chain.settled and widths[:3] == [1, 1, 1]  # settled, and drafting while the history's rate holds
    unmeasured = [w for i, w in enumerate(widths) if i % every]
    assert unmeasured[-8:] == [0] * 8  # then it stops, whatever the class it does not know
    assert s.rates.first == [3 * every, 0]  # every step's first position counted, drafted or judged where it stopped
    step(agree=False)  # (a measured step: it knows the class there)
    before = list(s.rates.first)
    assert step(agree=True) == 0 and s.rates.first == [before[0] + 1, before[1] + 1]  # a stop the target agreed with


def test_a_chain_is_settled_when_knowing_the_class_is_worth_less_than_measuring_it():
    """A class that would score a second position but is rarely found is worth less a step than measuring every step
    costs (``measure_cost``): the chain is settled, and at a measured step that finds the class it still scores, at
    an unmeasured one it drafts one token. Found often, the class is worth measuring: not settled. Nor while the
    rates rest on fewer than ``settle_after`` positions."""
    kls = np.linspace(0.0, 2.0, 101)  # class thresholds 0.45, 0.9, 1.8: the logits below are class 1
    class_1 = torch.tensor([[3.5, 0, 0, 0, 0, 0, 0, 0]])
    yields = [(1, 1)] * 9 + [(1, 2)] * 4  # lambda = 17 / (13 (V(1) + c)) = 1.2

    def schedule(shares, reached=(200, 15, 0, 0), accepted=(100, 14.5, 0, 0)):  # class 1 right 97% of the time
        return CertifiedSchedule(max_depth=8, cost=0.1, history=history(kls=kls, reached=reached, accepted=accepted,
                                                                         shares=shares, yields=yields))

    s = schedule(shares=[200, 15, 0, 0])  # class 1 found at 1 position in 14
    assert s.widths(0, class_1, 1, 100) == [1]  # a measured step (the first) that found class 1 ...
    assert s.chain.rate == pytest.approx(1.2, abs=1e-3) and s.chain.settled
    inputs = rule(s, s.chain.rate, 0.1)
    alpha = inputs["alphas"]
    assert all(gain(0, a, inputs) > 0 for a in alpha)  # every class pays at the first position
    assert scoring_gain(1, alpha[1], **inputs) > 0 > scoring_gain(1, alpha[0], **inputs)  # after class 1 a second
    worth = settling_worth(**inputs)
    assert worth == pytest.approx(inputs["shares"][1] * scoring_gain(1, alpha[1], **inputs))
    assert 0 < worth <= s.chain.rate * DEFAULT.measure_cost
    assert s.may_extend(1)  # ... still scores: the class is known there
    s.observe(DraftTree([0], [-1], torch.cat([class_1, class_1]), [True, False]), torch.zeros(2, 8), [0])
    assert s.chain.settled and not s.certifies
    assert s.widths(0, class_1, 1, 100) == [1] and not s.may_extend(1)  # an unmeasured step: one token
    often = schedule(shares=[100, 115, 0, 0])  # class 1 found at half the positions: worth measuring every step
    often.widths(0, class_1, 1, 100)
    assert settling_worth(**rule(often, often.chain.rate, 0.1)) > often.chain.rate * DEFAULT.measure_cost
    assert not often.chain.settled
    scale = (DEFAULT.settle_after - 1) / 215  # the same rates, learnt from too few positions
    few = schedule(shares=[200, 15, 0, 0], reached=[x * scale for x in (200, 15, 0, 0)],
                   accepted=[x * scale for x in (100, 14.5, 0, 0)])
    few.widths(0, class_1, 1, 100)
    assert all(gain(0, a, rule(few, few.chain.rate, 0.1)) > 0 for a in rule(few, 1.2, 0.1)["alphas"])
    assert not few.chain.settled
