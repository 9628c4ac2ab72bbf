"""The speculative decoder on tiny random Llama and Qwen3 models: exactness, rules, soundness, trace."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reference import accepted_tokens, softmax
from specert import schedules
from specert.decoding import generate
from specert.drafters import ModelDrafter, NGramDrafter, drafter_from_spec, layer_skip_view, model_drafter
from specert.rules import rule
from specert.schedules import make_schedule
from specert.trace import SpecDecodeMetrics, write_trace
from tiny import tiny_model

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42]
SHAPES = [dict(k=1), dict(k=3), dict(k=6), dict(tree="3,2,1"), dict(tree="2,2,2,2"), dict(k="auto"),
          dict(tree="auto:12"), dict(k="heuristic")]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request):
    return tiny_model(request.param, seed=1)


def _drafters(target):
    other = tiny_model("llama" if "llama" in target.name else "qwen3", seed=2, layers=2)
    return [
        ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2"),
        NGramDrafter(2),
        model_drafter(other, target),
        ModelDrafter(target.model, "self"),  # the target itself: every draft is certified and accepted
        drafter_from_spec("int8", target),
        drafter_from_spec("int4", target),
    ]


def test_strict_greedy_reproduces_target_greedy(target):
    base = generate(target, PROMPT, max_new_tokens=40).tokens
    assert len(base) == 40
    for drafter in _drafters(target):
        for shape in SHAPES:
            out = generate(target, PROMPT, drafter, "greedy", max_new_tokens=40, **shape)
            assert out.tokens == base, (drafter.spec, shape)
        out = generate(target, PROMPT, drafter, "tree:3", max_new_tokens=40, tree="3,2")
        assert out.tokens == base


def test_eos_and_max_new_tokens(target):
    base = generate(target, PROMPT, max_new_tokens=30).tokens
    eos = base[12]
    with_eos = tiny_model("llama" if "llama" in target.name else "qwen3", seed=1, eos=eos)
    stop = base.index(eos) + 1
    plain = generate(with_eos, PROMPT, max_new_tokens=30).tokens
    assert plain == base[:stop]
    for drafter in _drafters(with_eos):
        for shape in SHAPES:
            assert generate(with_eos, PROMPT, drafter, max_new_tokens=30, **shape).tokens == base[:stop]
            assert generate(with_eos, PROMPT, drafter, max_new_tokens=7, **shape).tokens == base[:7]


def test_the_self_drafter_accepts_everything_and_is_certified(target):
    out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=30, k=4, trace=True)
    m = SpecDecodeMetrics()
    m.observe(out)
    assert m.mean_acceptance_length > 4  # every draft accepted: 5 tokens per forward (bonus included)
    assert m.certified_positions == m.traced_positions > 0
    assert m.soundness_violations == 0


@pytest.mark.parametrize("spec", ["additive:0.3", "multiplicative:0.1", "topm:3", "typical:0.09,0.3",
                                  "topm:10&additive:0.6"])
def test_relaxed_rules_accept_only_what_they_accept(target, spec):
    """Every emitted token at a traced position is either the target's greedy token or one the rule accepts
    (judged by the reference implementation of the rule), and a rejected draft is never emitted."""
    r = rule(spec)
    for drafter in _drafters(target)[:3]:
        for shape in (dict(k=4), dict(tree="3,2")):
            out = generate(target, PROMPT, drafter, r, max_new_tokens=30, trace=True, **shape)
            assert out.trace
            m = SpecDecodeMetrics()
            m.observe(out)
            assert m.soundness_violations == 0
            for row in out.trace:
                if row.accepted:
                    assert row.emitted_token in row.draft_tokens
                else:
                    assert row.emitted_token == row.target_token
            # re-derive p at each traced position from a plain forward of the generated text
            full = torch.tensor([PROMPT + out.tokens])
            with torch.no_grad():
                logits = target.model(full).logits[0]
            for row in out.trace:
                p = softmax(logits[len(PROMPT) - 1 + row.token_index].numpy())
                ok = accepted_tokens(p, r)
                if row.accepted:
                    assert ok[row.emitted_token], (spec, drafter.spec, row)
                else:
                    assert not ok[row.draft_tokens].any(), (spec, drafter.spec, row)


def test_relaxed_rule_accepts_more_than_greedy(target):
    drafter = ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")
    m_greedy, m_relaxed = SpecDecodeMetrics(), SpecDecodeMetrics()
    m_greedy.observe(generate(target, PROMPT, drafter, "greedy", max_new_tokens=40, k=4))
    m_relaxed.observe(generate(target, PROMPT, drafter, "topm:8", max_new_tokens=40, k=4))
    assert m_relaxed.mean_acceptance_length >= m_greedy.mean_acceptance_length


def test_trace_parquet(target, tmp_path):
    drafter = ModelDrafter(layer_skip_view(target.model, 3), "layerskip:3")
    gens = [generate(target, PROMPT, drafter, "typical:0.09,0.3", max_new_tokens=20, k=3, trace=True),
            generate(target, PROMPT[:4], drafter, "typical:0.09,0.3", max_new_tokens=20, k=3, trace=True)]
    path = tmp_path / "trace.parquet"
    write_trace(path, gens, {"target": target.name, "drafter": "layerskip:3", "rule": "typical:0.09,0.3",
                             "shape": "k=3"})
    table = pq.read_table(path)
    assert table.num_rows == sum(len(g.trace) for g in gens)
    assert set(table.column("prompt_id").to_pylist()) == {0, 1}
    for col in ["target_token", "draft_tokens", "accepted", "kl", "certificate", "certificate_greedy", "p_top1",
                "margin", "entropy", "drafter_certificate", "rule", "drafter"]:
        assert col in table.column_names
    kl = np.array(table.column("kl").to_pylist())
    assert np.isfinite(kl).all() and (kl >= 0).all()
    assert b"specert" in table.schema.metadata


def test_certified_schedule_guarantee_and_economy(target, monkeypatch):
    """The auto schedules: wherever KL <= eps_hat the target's greedy token was covered (D_q soundness, live);
    a drafter close to the target and cheap drafts full chains, an unrelated one drafts less than a fixed chain."""
    close = ModelDrafter(target.model, "self")
    far = model_drafter(tiny_model("llama" if "llama" in target.name else "qwen3", seed=9, layers=1), target)
    for drafter in (close, far, ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")):
        for shape in (dict(k="auto"), dict(tree="auto:12")):
            out = generate(target, PROMPT, drafter, max_new_tokens=40, **shape)
            assert out.audit["held_covered"] == out.audit["held"]
    close.history.steps.clear()  # as if a target forward took 10^6 s and verifying a token were nearly free (a
    close.history.steps.extend([(0, 0.0, 10.0**6)] * schedules.MEASURED)  # GPU): drafting pays at any length
    monkeypatch.setattr(schedules, "VERIFY_TOKEN_COST", 0.01)
    full = generate(target, PROMPT, close, max_new_tokens=40, k="auto:6")
    assert min(full.drafted[:-1]) == 6 and out.audit is not None
    auto = generate(target, PROMPT, far, max_new_tokens=40, k="auto:8")
    fixed = generate(target, PROMPT, far, max_new_tokens=40, k=8)
    assert sum(auto.verified) / auto.steps < sum(fixed.verified) / fixed.steps


def test_certified_tree_never_cuts_a_width_to_fit_the_budget():
    """A position certified only at width m gets m children or none: fewer than m would void the guarantee (a
    benchmark run's audit caught 1 position of 364 where the budget had cut a certified 4 to 1)."""
    from specert.certificates import drafter_certificate
    from specert.schedules import CertifiedSchedule

    flat = torch.tensor([[3.0, 2.9, 2.8, 2.7, 0.0, -1.0, -2.0, -3.0]])  # four near-equal tokens: certified at m = 4
    peaked = torch.tensor([[9.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])  # certified at m = 1
    s = CertifiedSchedule(max_depth=3, max_width=8, budget=16)
    s.eps = [0.05] * 3
    m = next(w for w in range(1, 8) if float(drafter_certificate(flat[0], w)) > s.eps_hat)
    assert m > 1
    both = torch.cat([peaked, flat])
    assert s.widths(1, both, 2, budget_left=m + 1) == [1, m]
    assert s.widths(1, both, 2, budget_left=m) == [1, 0]  # m no longer fits after the first: no children
    assert s.widths(1, flat, 1, budget_left=m - 1) == [0]


def chain_widths(schedule, positions):
    """The widths a chain schedule gives drafter logits ``positions`` (each ``[V]``) depth by depth, up to the first
    0 (where the chain stops)."""
    out = []
    for depth, q in enumerate(positions):
        out.append(schedule.widths(depth, q[None], 1, 100)[0])
        if not out[-1]:
            break
    return out


@pytest.fixture
def verify_costs(monkeypatch):
    """The stopping rule's tests use fixed verification costs (the measured ones are the machine's): verifying any
    draft costs 1.4 one-token forwards, plus 0.01 per drafted token."""
    monkeypatch.setattr(schedules, "VERIFY_COST", 1.4)
    monkeypatch.setattr(schedules, "VERIFY_TOKEN_COST", 0.01)


@pytest.fixture
def dear_verification(monkeypatch):
    """Verification costs that a doubtful token cannot pay: 1 + 0.35 one-token forwards per drafted token. (A
    chain position whose logits the drafter has computed costs only its verification: with 0.01 per token, any token
    pays for it.)"""
    monkeypatch.setattr(schedules, "VERIFY_COST", 1.0)
    monkeypatch.setattr(schedules, "VERIFY_TOKEN_COST", 0.35)


def test_certified_chain_runs_past_the_certificate_only_while_it_pays(dear_verification):
    """The chain's stopping rule (specert.schedules): with uncertified drafts measured mostly rejected it ends at
    the first uncertified position (the paper's rule); measured mostly accepted with a cheap drafter it runs on; a
    drafter as costly as the target cannot pay (a surely accepted token for a forward's cost) and drafts nothing."""
    from specert.certificates import drafter_certificate
    from specert.schedules import VERIFY_COST, VERIFY_TOKEN_COST, CertifiedSchedule

    sure = torch.tensor([6.0, 0, 0, 0, 0, 0, 0, 0])
    unsure = torch.tensor([1.0, 0.9, 0, 0, 0, 0, 0, 0])
    chain = [sure, sure, unsure, sure, unsure]

    def widths(s):
        return chain_widths(s, chain)

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.eps = [float(drafter_certificate(unsure, 1) + drafter_certificate(sure, 1)) / 2] * 3
    s.history.reached, s.history.accepted = [10, 0, 0, 50], [2, 0, 0, 50]
    assert widths(s) == [1, 1, 0]
    s.history.reached, s.history.accepted = [50, 0, 0, 50], [49, 0, 0, 50]
    assert widths(s) == [1, 1, 1, 1, 1]
    s.fixed_cost = 1.0
    assert widths(s) == [0]
    s.fixed_cost = 0.1
    s.history.reached, s.history.accepted = [600, 0, 0, 0], [188, 0, 0, 0]  # the shipped head, measured
    assert s.widths(0, unsure[None], 1, 100) == [0]  # a draft right 31% of the time cannot pay for verifying it
    s.fixed_cost = None  # measured: drafting seconds per token over a one-token forward
    s.timed(0.2, 0.5 * (VERIFY_COST + VERIFY_TOKEN_COST * 8), 8)  # a one-token forward: 0.5 s
    assert s.costs()[1] == pytest.approx(0.2 / 8 / 0.5)  # one length: all of it per token
    for n in (2, 4, 12):  # lengths that vary: 0.1 s per step and 0.0125 s per token
        s.timed(0.1 + 0.0125 * n, 0.5 * (VERIFY_COST + VERIFY_TOKEN_COST * n), n)
    s.history.steps.popleft()
    assert s.costs() == pytest.approx((0.1 / 0.5, 0.0125 / 0.5))
    with pytest.raises(ValueError, match="cost"):
        CertifiedSchedule(cost=-1.0)


def test_certified_chain_drafts_while_its_tokens_beat_the_drafters_rate(verify_costs):
    """The stopping rule (specert.schedules): draft on while the tokens the next positions add beat lambda times
    their cost, lambda the rate of the latest steps (at least 1); the first draft pays for the verification, so the
    rule looks past it."""
    from specert.schedules import VERIFY_COST, VERIFY_TOKEN_COST, CertifiedSchedule

    s = CertifiedSchedule(max_depth=16, cost=0.3)
    assert s.rate(0.0, 0.3) == 1.0  # nothing measured: plain decoding's rate
    s.history.yields.extend([(12, 13)] * 4)  # 13 tokens for 1.4 + 12 * (0.01 + 0.3) = 5.12 forwards per step
    assert s.rate(0.0, 0.3) == pytest.approx(13 / (VERIFY_COST + 12 * (VERIFY_TOKEN_COST + 0.3)))
    s.history.yields.clear()
    s.history.yields.extend([(0, 1)] * 4)  # drafting nothing costs F on top of a plain forward: plain is better
    assert s.rate(0.5, 0.3) == 1.0
    s._costs = (0.0, 0.3)
    # the step's first token carries the verification's fixed cost (0.41); the drafter's forward that scored it is
    # spent, unless drafting nothing sends the drafter into the back-off (lambda <= 1), which saves it later
    s._rate = 1.8  # a token surviving with 0.7 is worth 0.7 < 1.8 * 0.41; followed by ones at 1/2, never
    assert not s.pays(0, 0.7)
    s._rate = 1.5  # 0.7 > 1.5 * 0.41: the drafter's forward is not charged, it ran whatever this step does
    assert s.net(0, 0.7) == pytest.approx(0.7 - 1.5 * (VERIFY_COST + VERIFY_TOKEN_COST - 1))
    s._rate = 1.0  # with the back-off: worth 0.7 < 0.71 alone, but with the one after it 1.05 > 0.42 + 2 * 0.3
    assert s.pays(0, 0.7) and s.net(0, 0.7) == pytest.approx(1.05 - (VERIFY_COST + 2 * VERIFY_TOKEN_COST - 1 + 0.6))
    # later in the chain a position's logits are computed already: its token costs its verification, and every
    # token after it a drafter forward more
    s._rate = 2.6
    assert s.net(5, 0.7) == pytest.approx(0.7 - 2.6 * VERIFY_TOKEN_COST)
    s._rate = 2.0
    s.history.reached, s.history.accepted = [0.0, 0, 0, 100.0], [0.0, 0, 0, 98.0]
    s.history.shares = [0.0, 0, 0, 100.0]  # positions after it: mean rate 0.96
    # the first draft carries the verification (0.41 of a forward): 0.8 < 2 * 0.41, but with those after it it pays
    assert 0.8 < s._rate * (VERIFY_COST + VERIFY_TOKEN_COST - 1) and s.pays(0, 0.8)
    s.history.reached, s.history.accepted = [0.0, 0, 0, 100.0], [0.0, 0, 0, 50.0]
    assert not s.pays(0, 0.8)
    s.history.yields.clear()
    s.history.yields.extend([(12, 13)] * 4)
    s.eps, sure = [0.01] * 3, torch.tensor([[6.0, 0, 0, 0, 0, 0, 0, 0]])
    s.widths(0, sure, 1, 100)
    assert s._rate == pytest.approx(s.rate(0.0, 0.3)) and s._rate > 2
    s.room = 3  # the generation's last tokens: no long run to earn lambda in, plain decoding is the alternative
    s.widths(0, sure, 1, 100)
    assert s._rate == 1.0
    s.history.yields.extend([(2, 3)] * 64)  # ... but with chains of 2 tokens, 3 tokens are more than one step's
    s.widths(0, sure, 1, 100)
    assert s._rate == pytest.approx(s.rate(0.0, 0.3)) and s._rate > 1


def test_certified_chain_drafts_to_lengths_that_verify_cheaply(verify_costs):
    """V(n), what the target's forward costs when it verifies n drafted tokens, is measured once MEASURED
    verifications of n were timed (a CPU's matrix kernels make it uneven): a sure chain that the prior runs to its
    end stops before lengths that verify dearly, and runs on through them to one that verifies cheaply."""
    from specert.schedules import KEEP, MEASURED, CertifiedSchedule, verify_cost

    sure = torch.tensor([[6.0, 0, 0, 0, 0, 0, 0, 0]])
    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.eps = [0.01] * 3
    s.history.reached, s.history.accepted = [0.0, 0, 0, 100.0], [0.0, 0, 0, 98.0]

    def chain():
        depth = 0
        while depth < 8 and s.widths(depth, sure, 1, 100)[0]:
            depth += 1
        return depth

    def measure(costs):  # V(n) for n = 1 .. 8 (or {n: V(n)}), timed MEASURED times each; a forward takes 0.5 s
        s.history.steps.clear()
        s.history.verified.clear()
        for n, v in (costs if isinstance(costs, dict) else dict(enumerate(costs, 1))).items():
            s.history.steps.extend([(n, 0.0, 0.5 * v)] * MEASURED)

    assert s.verify_costs() == [verify_cost(n) for n in range(9)] and chain() == 8  # the prior: near free
    dear = [verify_cost(1), 1.45, 1.5, 5.0, 5.0, 5.0, 5.0, 5.1]  # verifying 5 tokens or more costs 5 forwards
    measure(dear)
    assert s.forward_seconds() == pytest.approx(0.5)  # from the verifications of one drafted token
    assert s.verify_costs() == pytest.approx([1.0] + dear)
    assert chain() == 3
    measure(dear[:6] + [2.0, 5.1])  # ... but 8 tokens verify in 2
    assert chain() == 7
    measure(dear[:3])  # too few timings of 4 drafted tokens and more: priced at the longest measured length's V,
    assert s.verify_costs()[4:] == pytest.approx([dear[2]] * 5) and chain() == 8  # so the chain drafts to them
    measure({1: verify_cost(1), 2: 1.5, 8: 2.1})  # between measured lengths: the straight line
    assert s.verify_costs() == pytest.approx([1.0, verify_cost(1), 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1])
    s.history.steps.clear()  # lengths timed before, none in the latest steps: each keeps its last measured V
    s.history.steps.extend([(1, 0.0, 0.5 * verify_cost(1))] * MEASURED)
    assert s.verify_costs() == pytest.approx([1.0, verify_cost(1), 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1])
    s.history.steps.extend([(2, 0.0, 0.5 * 1.2)] * MEASURED)  # timed again: its new V
    assert s.verify_costs()[:3] == pytest.approx([1.0, verify_cost(1), 1.2])
    s.history.timed += KEEP  # KEEP steps later, still timed in the latest steps: still theirs; the others kept
    assert s.verify_costs() == pytest.approx([1.0, verify_cost(1), 1.2, 1.35, 1.5, 1.65, 1.8, 1.95, 2.1])
    s.history.timed += 1  # ... but not for good: gone from the latest steps, V(8) is measured again
    s.history.steps.clear()  # (one step more, and the timings of 1 and 2 drafted tokens still the latest)
    s.history.steps.extend([(1, 0.0, 0.5 * verify_cost(1))] * MEASURED + [(2, 0.0, 0.5 * 1.2)] * MEASURED)
    assert s.verify_costs() == pytest.approx([1.0, verify_cost(1)] + [1.2] * 7)
    s.history.verified.clear()
    s.history.steps.clear()
    assert s.verify_costs() == [verify_cost(n) for n in range(9)]  # none measured: the prior


def test_certified_chain_drafts_past_lengths_it_has_not_measured_at_this_machines_rate():
    """The lengths not drafted yet are priced at the longest measured length's V (the least they can cost), not by
    the prior nor by a line through the short lengths: a sure chain runs on to them and so measures them. (On the
    embedded model k=auto stopped at 9 drafted tokens when the prior priced 10 and more above what 9 measured; a
    line through lengths 1-5, steeper per token than the long lengths on a CPU, kept int4's chains at a mean
    acceptance length of 3.8 for a whole run, session 14.)"""
    from specert.schedules import MEASURED, CertifiedSchedule, verify_cost

    sure = torch.tensor([[6.0, 0, 0, 0, 0, 0, 0, 0]])
    s = CertifiedSchedule(max_depth=12, cost=0.1)
    s.eps = [0.01] * 3
    s.history.reached, s.history.accepted = [0.0, 0, 0, 100.0], [0.0, 0, 0, 99.0]
    s.history.yields.extend([(4, 5)] * 4)

    def chain():
        depth = 0
        while depth < 12 and s.widths(depth, sure, 1, 100)[0]:
            depth += 1
        return depth

    one = verify_cost(1)  # V(1), the unit's own measure (a one-token forward taking 0.5 s)
    for n in range(1, 5):  # V(1 .. 4) measured: 0.05 per drafted token
        s.history.steps.extend([(n, 0.0, 0.5 * (one + 0.05 * (n - 1)))] * MEASURED)
    assert s.verify_costs()[5:] == pytest.approx([one + 0.05 * 3] * 8)
    assert verify_cost(5) - s.verify_costs()[4] > 0.5  # the prior would price the fifth token at 0.6 forwards
    assert chain() == 12


def test_verification_costs_are_measured_against_the_forwards_of_their_time():
    """V(n) divides each verification's seconds by the one-token forwards just before it, not by one median over
    the history: a length drafted only in a short prompt (forwards of 30 ms) is not read cheaper than one token
    against the 36 ms forwards of the long prompts after it."""
    from specert.schedules import CertifiedSchedule, verify_cost

    s = CertifiedSchedule(max_depth=4)
    one = verify_cost(1)  # the prior's V(1), the unit's own measure
    s.history.steps.extend([(1, 0.0, 0.030 * one)] * 20 + [(2, 0.0, 0.030 * 1.1)] * 3 + [(1, 0.0, 0.036 * one)] * 60)
    assert s.forward_seconds() == pytest.approx(0.036)  # the history's median: the long prompts'
    assert s.verify_costs()[:3] == pytest.approx([1.0, one, 1.1])  # against it V(2) would read 0.92


def test_certified_chain_without_a_distribution_stops_on_its_measured_acceptance():
    """A drafter without a distribution (n-grams) gets no certificates: its chain is measured from its first step,
    every position uncertified, and stops by the rule on that rate (it drafted every chain to the limit before)."""
    from specert.drafters import DraftTree
    from specert.schedules import CertifiedSchedule

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    assert s.widths(0, None, 1, 100) == [1]  # nothing measured: it drafts, to learn
    tree = DraftTree([5], [-1], None, [False] * 2)
    target = torch.zeros(2, 8)
    target[0, 2] = 5.0  # rejects the drafted token
    s.observe(tree, target, [])
    assert s.history.reached == [1.0, 0, 0, 0] and s.history.accepted == [0.0, 0, 0, 0]
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [6.0, 0, 0, 0]  # right 1 time in 10: cannot pay
    assert s.widths(0, None, 1, 100) == [0]
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [57.0, 0, 0, 0]  # right 19 times in 20: a long chain
    depth = 0
    while depth < 8 and s.widths(depth, None, 1, 100)[0]:
        depth += 1
    assert depth == 8


def test_a_chain_without_a_distribution_probes_after_backing_off():
    """An n-gram chain whose estimate says drafting cannot pay drafts nothing, backs off, and then drafts one token
    anyway (a probe: no stop token is judged for it, so without probes a low estimate would stop it for good, as
    it did on Spec-Bench after a warm-up on a story). A rejected probe doubles the back-off; an accepted one raises
    the estimate and ends it."""
    from specert.drafters import DraftTree
    from specert.schedules import CertifiedSchedule

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [3.0, 0, 0, 0]  # right 1 time in 20

    def step(drafted, accepted):
        """One decoding step: (whether the drafter ran, its widths); the target accepts ``accepted`` tokens."""
        if not s.should_draft():  # plain decoding: the decoder neither asks nor tells the schedule
            return False, []
        widths = []
        while len(widths) < 8 and s.widths(len(widths), None, 1, 100)[0]:
            widths.append(1)
        tokens = [5] * min(len(widths), drafted)
        s.observe(DraftTree(tokens, list(range(-1, len(tokens) - 1)), None, [False] * (1 + len(tokens))),
                  torch.zeros(1 + len(tokens), 8), list(range(accepted)))
        return True, widths

    assert step(1, 0) == (True, [])  # the rule stops it: nothing drafted
    assert step(1, 0) == (False, [])  # backing off one step
    assert step(1, 0) == (True, [1])  # the probe: one token, rejected
    assert [step(1, 0)[0] for _ in range(3)] == [False, False, True]  # backing off two steps, probing again
    before = s.alpha(0)
    assert [step(1, 1)[0] for _ in range(4)] == [False, False, False, False]  # four, then the probe is accepted
    assert step(1, 1) == (True, [1])
    assert s.alpha(0) > before and s._backoff == 0


def test_a_drafter_with_nothing_to_draft_is_not_backed_off():
    """A chain's back-off follows the rule's stops only: a drafter that had nothing to draft (an n-gram drafter finding
    no match, which never asks for widths) is looked at again at the next step, even where the rate is 1 (the end
    of a generation); one whose first position the rule stopped there is not run for a step. A tree backs off after
    any empty step."""
    from specert.drafters import DraftTree
    from specert.schedules import CertifiedSchedule

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [3.0, 0, 0, 0]  # right 1 time in 20: it stops
    nothing = DraftTree([], [], None, [False])
    for _ in range(3):
        assert s.should_draft()
        s.observe(nothing, torch.zeros(1, 8), [])  # no match: widths never asked
    assert s._rate == 1 and s._backoff == 0
    assert s.should_draft() and s.widths(0, None, 1, 100, guess=(0, 5)) == [0]  # the rule stops it
    s.observe(nothing, torch.zeros(1, 8), [])
    assert not s.should_draft() and s.should_draft()  # one step without it
    tree = CertifiedSchedule(max_width=8)  # a tree has no lambda to say its drafting pays: an empty step backs off
    tree.observe(nothing, torch.zeros(1, 8), [])
    assert not tree.should_draft() and tree.should_draft()


def test_the_drafting_cost_is_not_charged_with_steps_that_drafted_nothing():
    """c, a drafted token's cost, is the slope of a step's seconds against its drafted tokens: steps that drafted
    nothing (their seconds are the step's own) do not inflate it, whether the slope is fitted or, with too few
    drafting steps for one, a ratio over the steps that drafted."""
    from specert.schedules import CertifiedSchedule

    s = CertifiedSchedule()
    one = 0.5
    s.history.steps.extend([(0, 0.01, one)] * 35 + [(1, 0.012, one)] * 15)
    fixed, c = s.costs()
    unit = s.forward_seconds()  # about 0.5 s
    assert fixed == pytest.approx(0.01 / unit) and c == pytest.approx(0.002 / unit)
    s.history.steps.clear()
    s.history.steps.extend([(0, 0.01, one)] * 40 + [(1, 0.012, one)] * 3)
    unit = s.forward_seconds()
    assert s.costs() == pytest.approx((0.0, 0.012 / unit))  # was (0.4 + 0.036) / 3: twelve times more


def test_a_chain_reprices_every_few_steps():
    """A chain's prices (F, c, V, lambda) are recomputed at the first step of a generation, at every step while
    the history is short, and every REPRICE steps after: a drafter that turns dearer is priced so within REPRICE
    steps, and between two pricings the prices stand."""
    from specert.schedules import PRICED, REPRICE, CertifiedSchedule

    one = 0.03
    history = CertifiedSchedule().history
    history.steps.extend([(n % 4, 0.002 + 0.001 * (n % 4), one) for n in range(2 * PRICED)])
    s = CertifiedSchedule(max_depth=4, history=history)
    s.widths(0, None, 1, 100)
    cheap = s._costs[1]
    assert cheap == pytest.approx(0.001 / one, rel=0.05)
    history.steps.extend([(n % 4, 0.002 + 0.01 * (n % 4), one) for n in range(256)])  # ten times dearer
    prices = []
    for _ in range(REPRICE):
        s.widths(0, None, 1, 100)
        prices.append(s._costs[1])
    assert prices[0] == cheap and prices[-1] == pytest.approx(0.01 / one, rel=0.05)
    assert prices.count(prices[-1]) == 1  # repriced once, at the last of these steps
    short = CertifiedSchedule(max_depth=4)  # a short history: every step
    short.history.steps.extend([(1, 0.003, one)] * 8)
    short.widths(0, None, 1, 100)
    short.history.steps.extend([(1, 0.03, one)] * 16)
    short.widths(0, None, 1, 100)
    assert short._costs[1] == pytest.approx(0.03 / short.forward_seconds())


def test_a_burst_of_slowed_steps_does_not_move_the_measured_costs():
    """Timing noise on a shared machine is one-sided: a burst of steps slowed threefold by another process (8 of 68)
    leaves the unit, F, c and V where the steady steps put them (every timing is a median; the mean moved the unit
    by a third)."""
    from specert.schedules import CertifiedSchedule, verify_cost

    one = 0.03  # a one-token forward's seconds

    def step(n, slowed=1.0):  # drafting: 4 ms a step and 10 ms a token; verifying n: 0.8 + 0.05 n forwards
        return n, slowed * (0.004 + 0.01 * n), slowed * one * (0.8 + 0.05 * n)

    s = CertifiedSchedule(max_depth=12)
    s.history.steps.extend(step(n) for n in (1, 4, 8, 12) for _ in range(15))
    unit, costs, verify = s.forward_seconds(), s.costs(), s.verify_costs()
    assert unit == pytest.approx(one * 0.85 / verify_cost(1)) and costs == pytest.approx((0.004 / unit, 0.01 / unit))
    s.history.steps.extend(step(n, slowed=3.0) for n in (1, 1, 1, 12, 12, 12, 12, 12))
    assert s.forward_seconds() == pytest.approx(unit)
    assert s.costs() == pytest.approx(costs, rel=0.02) and s.verify_costs() == pytest.approx(verify, rel=0.02)


def test_a_chain_does_not_score_a_last_token_whose_successor_cannot_pay(target):
    """may_extend: the certified chain asks the drafter for the logits after its latest token only if the position
    there pays for that forward on average over the classes it may find (it stops there otherwise, whatever its
    class): the drafter's forward is skipped, and the output stays the target's greedy output."""
    from specert.schedules import CertifiedSchedule, FixedSchedule

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    assert s.may_extend(1)  # nothing measured yet: it drafts, to learn
    s.eps = [0.01] * 3
    s.history.reached, s.history.accepted = [50.0, 0, 0, 50.0], [5.0, 0, 0, 10.0]  # right 1 time in 5 at best
    s._survive = 0.2
    assert not s.may_extend(1)
    s.history.reached, s.history.accepted = [50.0, 0, 0, 50.0], [5.0, 0, 0, 49.0]  # certified ones nearly always right
    s._survive = 0.98
    assert s.may_extend(1)
    assert CertifiedSchedule(max_width=8).may_extend(3) and FixedSchedule([1, 1]).may_extend(1)  # trees, fixed

    class Stop(FixedSchedule):  # a chain of 3 that refuses to look past its first token
        def may_extend(self, depth):
            return depth < 1

    drafter = ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")
    runs = []
    drafter._run = lambda tokens, _run=drafter._run: runs.append(len(tokens)) or _run(tokens)
    tree = drafter.propose(PROMPT, Stop([1, 1, 1]))
    assert len(tree.tokens) == 1 and len(runs) == 1  # the context's forward only: the drafted token not scored


def test_a_settled_chain_measures_one_step_in_sample(dear_verification, monkeypatch):
    """A chain that is one token whatever its class (every class pays at the first position, none would score a
    second: the draft head's on this machine) asks neither the drafter's certificate nor the KL after it, except at
    one step in SAMPLE: the rates, eps_hat and the audit learn from that sample, and every step drafts one token. It
    is priced one step in SETTLED_REPRICE.
    With a class that does not pay, the chain is not settled and measures every step."""
    from specert.drafters import DraftTree
    from specert.schedules import PRICED, SAMPLE, SETTLED_REPRICE, CertifiedSchedule

    certificates = []
    monkeypatch.setattr(schedules, "top1_certificates",
                        lambda q, _f=schedules.top1_certificates: certificates.append(1) or _f(q))
    gen = torch.Generator().manual_seed(0)
    s = CertifiedSchedule(max_depth=8, cost=0.1)
    s.history.kls.extend([0.5] * 100)
    s.eps = s._estimate()
    s.history.reached, s.history.accepted = [100.0] * 4, [60.0] * 4  # every class right 6 times in 10
    s.history.steps.extend([(1, 0.0, 1.35), (2, 0.0, 1.7)] * PRICED)  # V(1) = 1.35, V(2) = 1.7 (dear_verification's)
    s.history.yields.extend([(1, 2)] * 64)  # lambda = 2 / (1.35 + 0.1): the first token pays at 0.6, a second not
    measured = []
    for step in range(3 * SAMPLE):
        asked = s.certifies
        q = torch.randn(1, 16, generator=gen)
        assert s.widths(0, q, 1, 100) == [1] and not s.may_extend(1)
        kls, reached = len(s.history.kls), sum(s.history.shares)
        s.observe(DraftTree([int(q.argmax())], [-1], torch.cat([q, q]), [True, False]),
                  torch.randn(2, 16, generator=gen), [0])
        measured.append((asked, len(s.history.kls) > kls, sum(s.history.shares) > reached))
        assert step == 0 or s._settled
    assert measured == [(step % SAMPLE == 0,) * 3 for step in range(3 * SAMPLE)]
    assert len(certificates) == 3  # the measured steps' only
    priced = []
    monkeypatch.setattr(CertifiedSchedule, "verify_costs",
                        lambda self, _f=CertifiedSchedule.verify_costs: priced.append(1) or _f(self))
    for _ in range(SETTLED_REPRICE):
        assert s.widths(0, torch.randn(1, 16, generator=gen), 1, 100) == [1] and s._settled
    assert len(priced) == 1  # priced one step in SETTLED_REPRICE, not in REPRICE
    s.history.reached[0], s.history.accepted[0] = 100.0, 10.0  # class 0 right 1 time in 10: it stops there
    s._priced = 0  # (repriced at the next step)
    for _ in range(SAMPLE):
        assert s.certifies
        s.widths(0, torch.randn(1, 16, generator=gen), 1, 100)
        assert not s._settled and s._measured
        s.observe(DraftTree([], [], torch.randn(1, 16, generator=gen), [True]), torch.randn(1, 16, generator=gen), [])


def test_a_settled_chain_stops_where_this_generations_first_positions_stop_paying(dear_verification):
    """A settled chain knows its position's class at one step in SAMPLE, but whether its token was accepted at
    every step: this generation's first positions (alpha_first) decide its other steps. Rejected at every step (the
    draft head on a translation: accepted 2-4% of the time), it stops drafting at the unmeasured steps, and the
    target's bonus token judges the token where it stopped."""
    from specert.drafters import DraftTree
    from specert.schedules import PRICED, SAMPLE, CertifiedSchedule

    gen = torch.Generator().manual_seed(0)
    s = CertifiedSchedule(max_depth=8, cost=0.1)
    s.history.kls.extend([0.5] * 100)
    s.eps = s._estimate()
    s.history.reached, s.history.accepted = [100.0] * 4, [60.0] * 4  # every class right 6 times in 10
    s.history.steps.extend([(1, 0.0, 1.35), (2, 0.0, 1.7)] * PRICED)  # V(1) = 1.35: a first token pays at 0.6
    s.history.yields.extend([(1, 2)] * 64)

    def step(agree: bool) -> int:
        q = torch.randn(1, 16, generator=gen)
        width = s.widths(0, q, 1, 100)[0]
        target = torch.randn(1 + width, 16, generator=gen)
        target[0, int(q.argmax())] = 10.0 if agree else -10.0  # the target's greedy token is the drafter's, or not
        tokens = [int(q.argmax())] * width
        s.observe(DraftTree(tokens, [-1] * width, torch.cat([q] * (1 + width)), [True] + [False] * width), target,
                  [0] if agree and width else [])
        return width

    widths = [step(agree=False) for _ in range(3 * SAMPLE)]
    assert s._settled and widths[:3] == [1, 1, 1]  # settled, and drafting while the history's rate holds
    unmeasured = [w for i, w in enumerate(widths) if i % SAMPLE]
    assert unmeasured[-8:] == [0] * 8  # then it stops, whatever the class it does not know
    assert s._first == [3 * SAMPLE, 0]  # every step's first position counted, drafted or judged where it stopped
    step(agree=False)  # (a measured step: it knows the class there)
    before = list(s._first)
    assert step(agree=True) == 0 and s._first == [before[0] + 1, before[1] + 1]  # a stop the target agreed with


def test_a_chain_is_settled_when_knowing_the_class_is_worth_less_than_measuring_it():
    """settled: a class that would score a second position but is rarely found is worth less a step than measuring
    every step costs (MEASURE_COST): the chain is settled, and at a measured step that finds the class it still
    scores. Found often, it is worth measuring: not settled. (Before session 21 any class that scored unsettled the
    chain: the draft head's class 1 in extraction.) Nor while the rates rest on fewer than SETTLE_AFTER positions."""
    from specert.schedules import MEASURE_COST, SETTLE_AFTER, CertifiedSchedule

    s = CertifiedSchedule(max_depth=8)
    s.eps, s._costs, s._rate = [0.01] * 3, (0.0, 0.1), 1.2
    s.history.reached, s.history.accepted = [200.0, 15.0, 0, 0], [100.0, 14.5, 0, 0]  # class 1 right 97% of the time
    s.history.shares = [200.0, 15.0, 0, 0]  # found at 1 position in 14
    assert all(s.pays(0, s.alpha(level)) for level in range(4))
    assert s._scores(1, s.alpha(1)) and not s._scores(1, s.alpha(0))  # after a class-1 token a second one pays
    worth = s.shares()[1] * s._scoring(1, s.alpha(1))
    assert 0 < worth <= s._rate * MEASURE_COST and s.settled()
    s._settled, s._measured, s._survive = True, True, s.alpha(1)  # a measured step that found class 1
    assert s.may_extend(1)
    s._measured = False  # an unmeasured one: one token
    assert not s.may_extend(1)
    s.history.shares = [100.0, 115.0, 0, 0]  # class 1 found at half the positions: worth measuring every step
    assert not s.settled()
    s.history.shares = [200.0, 15.0, 0, 0]
    s.history.reached = [x * (SETTLE_AFTER - 1) / 215 for x in s.history.reached]  # the same rates, but learnt
    s.history.accepted = [x * (SETTLE_AFTER - 1) / 215 for x in s.history.accepted]  # from too few positions
    assert all(s.pays(0, s.alpha(level)) for level in range(4)) and not s.settled()


def test_a_chain_scores_the_next_position_only_if_the_classes_found_there_pay_on_average():
    """may_extend weighs each class by how often chain positions fall in it: a class that would pay but is rarely
    found does not pay for a drafter forward at every step (the draft head ran a second forward at nearly every
    step for a position it drafted at 8 steps in 460), and one found often does."""
    from specert.schedules import CertifiedSchedule

    s = CertifiedSchedule(max_depth=8)
    s.eps, s._costs, s._rate, s._survive = [0.01] * 3, (0.0, 0.1), 1.2, 0.5
    s.history.reached, s.history.accepted = [200.0, 15.0, 0, 0], [60.0, 13.0, 0, 0]
    s.history.shares = [200.0, 15.0, 0, 0]
    assert s.pays(1, s._survive * s.alpha(1)) and not s.pays(1, s._survive * s.alpha(0))  # class 1 pays, 0 not
    assert not s.may_extend(1)  # class 1 is found at 1 position in 14
    s.history.shares = [20.0, 150.0, 0, 0]  # the same rates, class 1 found at 7 positions in 8
    assert s.may_extend(1)
    s._costs = (0.0, 0.0)  # a forward that costs nothing: scoring pays whenever some class would
    s.history.shares = [200.0, 15.0, 0, 0]
    assert s.may_extend(1)
    # a position whose class is not known yet expects the classes' rates weighed by their shares, not by the
    # counts behind the rates (which decay per class: the frequent class's saturate near RECENT)
    s.history.reached, s.history.accepted = [100.0, 100, 100, 250], [50.0, 90, 95, 249]
    s.history.shares = [8.0, 8, 8, 226]
    rates = [s.alpha(level) for level in range(4)]
    assert s.alpha_mean() == pytest.approx((9 * (rates[0] + rates[1] + rates[2]) + 227 * rates[3]) / 254)
    assert s.alpha_mean() > 0.96 > 0.88 > (sum(s.history.accepted) + 1) / (sum(s.history.reached) + 2)


def test_certified_chain_classes_positions_by_the_kl_level_their_certificate_reaches(dear_verification):
    """A chain position's class is how many of the KL quantiles LEVELS * quantile its D_q(1) exceeds, each class with
    its own measured acceptance rate: the chain runs on through a position certified nearly to eps_hat (its class
    accepted 97% of the time) and stops at one far below it (30%), where two classes, certified or not, stop at
    both; the verified step counts each position in its class; a class seen little is drawn toward the rate of all
    uncertified positions."""
    from specert.certificates import drafter_certificate
    from specert.drafters import DraftTree
    from specert.schedules import CERTIFIED, LEVELS, RECENT, CertifiedSchedule

    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.history.kls.extend(np.linspace(0.0, 2.0, 101))  # KL quantiles 0.45, 0.9, 1.8 at 0.225, 0.45, 0.9
    s.eps = s._estimate()
    assert s.eps == pytest.approx([0.45, 0.9, 1.8]) and s.eps_hat == pytest.approx(1.8)
    sure, near, low, far = (torch.tensor([x, 0, 0, 0, 0, 0, 0, 0.0]) for x in (7.0, 5.0, 3.5, 1.0))
    assert [s.level(float(drafter_certificate(q, 1))) for q in (sure, near, low, far)] == [CERTIFIED, 2, 1, 0]
    s.history.reached, s.history.accepted = [100.0, 100, 100, 100], [30.0, 70, 97, 99]

    assert chain_widths(s, [sure, near, sure, far, sure]) == [1, 1, 1, 0]
    with pytest.MonkeyPatch.context() as m:  # two classes: every uncertified position at the lowest one's rate
        m.setattr("specert.schedules.LEVELS", (1.0,) * len(LEVELS))
        two = CertifiedSchedule(max_depth=8, cost=0.3, history=s.history)
        assert chain_widths(two, [sure, near, sure, far, sure]) == [1, 0]
    tree = DraftTree([0, 0, 0], [-1, 0, 1], torch.stack([sure, near, sure, far]), [True] * 4)
    target = torch.zeros(4, 8)
    target[:, 0] = 5.0  # every drafted token accepted, and the far position's token 0 is the target's too
    s.observe(tree, target, [0, 1, 2])
    g = 1 - 1 / RECENT  # each position seen discounts the older ones of its class
    # sure twice, near once, the far stop judged by the target's bonus token (accepted), class 1 not seen
    assert s.history.reached == pytest.approx([100 * g + 1, 100, 100 * g + 1, 100 * g * g + g + 1])
    assert s.history.accepted == pytest.approx([30 * g + 1, 70, 97 * g + 1, 99 * g * g + g + 1])
    # the classes' shares decay together: the latest position weighs 1, the one before g, ...
    assert s.history.shares == pytest.approx([1, 0, g**2, g**3 + g])
    # a class seen little starts from the rate of all uncertified positions, not from 1/2 (the next generation:
    # this one's positions weigh in its rates too, schedules.PRIOR)
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=s.history)
    s.history.reached, s.history.accepted = [40.0, 0, 0, 100], [36.0, 0, 0, 99]
    assert s.alpha(2) == pytest.approx(37 / 42) and s.alpha(0) == pytest.approx((36 + 2 * 37 / 42) / 42)
    assert s.alpha(CERTIFIED) == pytest.approx(100 / 102)


def test_certified_chain_learns_from_where_it_stopped():
    """After a fully accepted chain, the target's bonus token says whether the token the drafter would have drafted
    where the chain stopped was right: the stop is measured without drafting it."""
    from specert.certificates import drafter_certificate
    from specert.drafters import DraftTree
    from specert.schedules import RECENT, CertifiedSchedule

    sure = torch.tensor([6.0, 0, 0, 0, 0, 0, 0, 0])
    unsure = torch.tensor([0.0, 0, 1.0, 0.9, 0, 0, 0, 0])  # would draft token 2
    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.eps = [float(drafter_certificate(unsure, 1) + drafter_certificate(sure, 1)) / 2] * 3
    s.history.reached, s.history.accepted = [4, 0, 0, 10], [0, 0, 0, 10]
    assert [s.widths(d, q[None], 1, 100)[0] for d, q in enumerate([sure, unsure])] == [1, 0]
    tree = DraftTree([0], [-1], torch.stack([sure, unsure]), [True, True])
    target = torch.zeros(2, 8)
    target[0, 0] = target[1, 2] = 5.0  # accepts the drafted 0, and its greedy token after it is the drafter's 2
    s.observe(tree, target, [0])
    g = 1 - 1 / RECENT  # each position seen discounts the older ones of its class
    assert s.history.reached == pytest.approx([4 * g + 1, 0, 0, 10 * g + 1])
    assert s.history.accepted == pytest.approx([0 * g + 1, 0, 0, 10 * g + 1])
    assert s.audit()["uncertified_accepted"] == 1


def test_certified_chain_follows_the_text_being_generated(verify_costs):
    """The acceptance rates weigh recent positions most (schedules.RECENT): after a long run of accepted uncertified
    drafts, a run of rejected ones brings the measured rate down to where the chain stops at them."""
    from specert.drafters import DraftTree
    from specert.schedules import RECENT, CertifiedSchedule

    unsure = torch.tensor([0.0, 0, 1.0, 0.9, 0, 0, 0, 0])  # would draft token 2
    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.eps = [100.0] * 3  # nothing is certified
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [57.0, 0, 0, 0]  # 95% of 60 accepted
    assert s.widths(0, unsure[None], 1, 100) == [1]
    target = torch.zeros(2, 8)
    target[0, 3] = 5.0  # the target wants 3: the drafted 2 is rejected
    for _ in range(RECENT // 2):
        s.eps = [100.0] * 3
        s.widths(0, unsure[None], 1, 100)
        s.observe(DraftTree([2], [-1], unsure[None].repeat(2, 1), [True, False]), target, [])
    assert s.alpha(0) < 0.7
    assert s.widths(0, unsure[None], 1, 100) == [0]


def test_certified_chain_follows_the_text_within_a_generation(verify_costs):
    """Within a generation a class's rate is this generation's positions with the history's rate weighing PRIOR
    positions (schedules.PRIOR): a drafter whose class-2 tokens the history accepted 90% of the time stops drafting
    them after a few rejections in this text, where the history alone (256 positions) would still have it draft;
    the next generation starts again from the history."""
    from specert.drafters import DraftTree
    from specert.schedules import PRIOR, CertifiedSchedule, History

    history = History(reached=[10.0, 10, 200, 0], accepted=[1.0, 3, 180, 0])
    s = CertifiedSchedule(max_depth=8, cost=0.3, history=history)
    target = torch.zeros(2, 8)
    target[:, 3] = 5.0  # the target wants 3: the drafter's 5 is rejected
    rejected = 0
    while s.widths(0, None, 1, 100, guess=(2, 5)) == [1] and rejected < 30:
        s.observe(DraftTree([5], [-1], None, [False, False]), target, [])
        rejected += 1
    fresh = CertifiedSchedule(max_depth=8, cost=0.3, history=history)  # the next generation
    assert 3 <= rejected <= 8 and fresh.alpha(2) > 0.85  # the history's rate (256 positions) barely moved
    assert s.alpha(2) == pytest.approx(PRIOR * fresh.alpha(2) / (rejected + PRIOR))
    assert fresh.widths(0, None, 1, 100, guess=(2, 5)) == [1]


def test_drafts_never_exceed_the_room_left(target):
    """No step drafts more tokens than max_new_tokens can still take (the bonus token comes free)."""
    for shape in (dict(k=8), dict(k="auto"), dict(k="heuristic:8")):
        out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=11, **shape)
        assert out.tokens == generate(target, PROMPT, max_new_tokens=11).tokens
        produced = 0
        for drafted, accepted in zip(out.drafted, out.accepted):
            assert drafted <= 11 - produced - 1
            produced += accepted + 1
        assert out.drafted == ([10] if shape == dict(k="auto") else [8, 1])  # self-drafts are all accepted


def test_heuristic_schedule_grows_and_shrinks(target):
    from specert.schedules import HeuristicSchedule

    sched = HeuristicSchedule(5)
    out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=40, k="heuristic")
    assert max(out.drafted) > 5  # all accepted: +2 per step
    tree = type("T", (), {"tokens": [1, 2, 3]})()
    sched.observe(tree, None, [0])
    assert sched.max_depth == 4


def test_metrics_conventions():
    from specert.decoding import Generation

    g = Generation([1], [1, 2, 3, 4, 5, 6], 1.0, accepted=[2, 0, 3], drafted=[3, 3, 3], verified=[4, 4, 4])
    m = SpecDecodeMetrics()
    m.observe(g)
    assert m.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert m.draft_acceptance_rate == pytest.approx(5 / 9)
    assert m.acceptance_rate_per_position == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert m.target_tokens_per_accepted == pytest.approx(12 / 5)
    assert m.verifying_tokens_per_accepted == pytest.approx(12 / 5)  # every step verified something
    m.observe(Generation([1], [7, 8], 1.0, accepted=[0, 1], drafted=[0, 1], verified=[1, 2]))  # a plain step
    assert m.target_tokens_per_accepted == pytest.approx(15 / 6)
    assert m.verifying_tokens_per_accepted == pytest.approx(14 / 6)  # its forward verified nothing
    assert m.drafted_per_accepted == pytest.approx(10 / 6)
    m.observe(Generation([1], [9], 1.0, accepted=[0], drafted=[2], verified=[5]))  # a tree of 4 nodes, 2 deep
    assert m.verifying_tokens_per_accepted == pytest.approx(19 / 6) and m.drafted_per_accepted == pytest.approx(14 / 6)


class TestBadInput:
    def test_widths(self):
        assert make_schedule(3).schedule == [1, 1, 1]
        assert make_schedule(tree="4,2,1").schedule == [4, 2, 1]
        assert make_schedule(tree="4,2,1").max_nodes == 4 + 8 + 8
        for kw, msg in [(dict(k=0), ">= 1"), (dict(tree="4,x"), "widths per depth"), (dict(tree="2,0"), ">= 1"),
                        (dict(k=2, tree="2"), "either k"), (dict(k="auto:x"), "whole number"),
                        (dict(tree="heuristic"), "drafts chains"), (dict(k="fast"), "auto")]:
            with pytest.raises(ValueError, match=msg):
                make_schedule(**kw)

    def test_vocabulary_mismatch(self, target):
        other = tiny_model("llama", seed=3, vocab=300)
        with pytest.raises(ValueError, match="must share the target's vocabulary"):
            model_drafter(other, target)

    def test_layerskip_depth(self, target):
        with pytest.raises(ValueError, match="1 <= L < 4"):
            layer_skip_view(target.model, 4)

    def test_prompt_and_budget(self, target):
        with pytest.raises(ValueError, match="empty"):
            generate(target, [], max_new_tokens=4)
        with pytest.raises(ValueError, match="exceed the context"):
            generate(target, list(range(10)), max_new_tokens=600)


def test_ngram_chain_copies_a_span():
    """After the longest suffix match, a chain continues the occurrence it copied from (not a fresh vote per
    token), and a tree's further children are the other continuations."""
    context = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 7, 7, 1, 2, 3]
    drafter = NGramDrafter(2)
    # suffix (2, 3) was followed by 9 and by 4, once each: the most recent (4) first, then its span 5, 6, 7
    chain = drafter.propose(context, make_schedule(k=4))
    assert chain.tokens == [4, 5, 6, 7] and chain.parents == [-1, 0, 1, 2]
    assert drafter.continuations(torch.tensor(context)) == (2, [(4, 8), (9, 3)])
    tree = drafter.propose(context, make_schedule(tree="2,1"))
    assert tree.tokens == [4, 9, 5, 9] and tree.parents == [-1, -1, 0, 1]


def test_ngram_chain_names_its_match_sizes_and_its_stops_are_judged():
    """An n-gram chain hands the schedule, with each token, the class of the match behind it (its size - 1, at most
    CERTIFIED - 1): a looked-up token behind a 1-token suffix, then copied tokens behind 2 and 3 tokens that agree.
    Where a certified chain stops, the target's bonus token judges the token it would have drafted there, so the
    class's acceptance is measured without drafting it (and a low estimate is revised without probes)."""
    from specert.schedules import RECENT, CertifiedSchedule, FixedSchedule

    context = [7, 8, 4, 5, 6, 1, 4]  # (1, 4) never occurred before; (4) did, followed by 5, 6, 1
    drafter = NGramDrafter(3)
    seen = []

    class Record(FixedSchedule):
        def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
            seen.append(guess)
            return super().widths(depth, logits, frontier, budget_left, certificate, guess)

    assert drafter.propose(context, Record([1] * 3)).tokens == [5, 6, 1]
    assert seen == [(0, 5), (1, 6), (2, 1)]
    s = CertifiedSchedule(max_depth=8, cost=0.3)
    s.history.reached, s.history.accepted = [60.0, 0, 0, 0], [3.0, 0, 0, 0]  # class 0: right 1 time in 20
    tree = drafter.propose(context, s)
    assert tree.tokens == []  # not worth drafting
    target = torch.zeros(1, 10)
    target[0, 5] = 1.0  # the target's token there is the one the chain stopped at
    s.observe(tree, target, [])
    decay = 1 - 1 / RECENT
    assert s.history.reached[0] == pytest.approx(60 * decay + 1)
    assert s.history.accepted[0] == pytest.approx(3 * decay + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_step_is_transformers_forward(arch, monkeypatch):
    """The lean path (one token, a causal run of a few, a tree under a mask), which :func:`forward_features` takes
    after a non-empty cache, runs the same modules as transformers' forward: same logits, hidden states and cache."""
    from specert import models
    from specert.drafters import ancestors
    from specert.quantized import quantized_copy

    def transformers_forward(model, cache, tokens, positions=None, attend=None, layers=()):
        with monkeypatch.context() as m:
            m.setattr(models, "can_step", lambda model: False)
            return models.forward_features(model, cache, tokens, layers, positions, attend)

    target = tiny_model(arch, seed=6)
    past = len(PROMPT) - 1
    tree = [-1, -1, 0, 0, 1]  # the root (the context's last token) and 5 drafted nodes
    attend = torch.zeros(6, past + 6, dtype=torch.bool)
    attend[:, : past + 1] = True
    attend[1:, past + 1 :] = ancestors(tree)
    positions = [past] + [past + 1 + d for d in (0, 0, 1, 1, 1)]
    runs = [([PROMPT[-1]], None, None), ([PROMPT[-1], 8, 9], None, None),
            ([PROMPT[-1], 11, 12, 13, 14, 15], positions, attend)]
    view = layer_skip_view(target.model, 2)
    quantized = quantized_copy(target.model, 4)
    assert hasattr(quantized.model.layers[0].self_attn, "qkv")  # the lean path runs its fused products
    for model in (target.model, quantized, view):
        assert models.can_step(model)
        # the embeddings, a layer's output, the final states (hidden states are read from targets, not views)
        layers = (0, 1, model.config.num_hidden_layers) if model is not view else ()
        for tokens, where, mask in runs:
            a, b = models.new_cache(model), models.new_cache(model)
            transformers_forward(model, a, PROMPT[:-1])
            transformers_forward(model, b, PROMPT[:-1])
            ref, ref_states = transformers_forward(model, a, tokens, where, mask, layers)
            got, states = models.forward_features(model, b, tokens, layers, where, mask)
            assert got.shape == ref.shape == (len(tokens), target.vocab_size)
            assert torch.allclose(got, ref, atol=1e-6 * float(ref.abs().max()))
            if layers:
                assert states.shape == ref_states.shape == (len(tokens), 3 * model.config.hidden_size)
                assert torch.allclose(states, ref_states, atol=1e-6 * float(ref_states.abs().max()))
            assert torch.equal(models.forward(model, models.new_cache(model), PROMPT), models.forward_features(
                model, models.new_cache(model), PROMPT, ())[0])  # an empty cache: transformers' own forward
            for x, y in zip(a.layers, b.layers):
                assert torch.allclose(x.keys, y.keys) and torch.allclose(x.values, y.values)
    assert not models.can_step(torch.nn.Linear(2, 2))


def test_a_tree_drafters_next_proposal_keeps_the_accepted_path(monkeypatch):
    """A model drafter scores each tree node as its path run causally. After a tree, it keeps the entries of the
    accepted nodes it ran (the path's causal entries) and runs only the rest: its next proposal equals that of a
    drafter synced from scratch."""
    target = tiny_model("llama", seed=3)
    drafter, fresh = (ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2") for _ in range(2))
    shape = dict(tree="2,2,1")
    tree = drafter.propose(list(PROMPT), make_schedule(**shape))
    for node in range(len(tree.tokens)):  # every node is scored as its path run causally (positions, mask)
        if tree.expanded[node + 1]:
            path, up = [], node
            while up >= 0:
                path, up = [tree.tokens[up]] + path, tree.parents[up]
            causal = fresh.propose(list(PROMPT) + path, make_schedule(k=1)).logits[0]
            assert torch.allclose(tree.logits[node + 1], causal, atol=1e-9), node
    first = 0
    second = next(i for i, p in enumerate(tree.parents) if p == first)
    deepest = next(i for i, p in enumerate(tree.parents) if p == second)  # a leaf: never run by the drafter
    ran, run = [], ModelDrafter._run
    monkeypatch.setattr(ModelDrafter, "_run", lambda self, tokens: ran.append(len(tokens)) or run(self, tokens))
    for accepted, runs in (([first, second], 1), ([first, second, deepest], 2), ([first], 1)):
        drafter.propose(list(PROMPT), make_schedule(**shape))
        context = list(PROMPT) + [tree.tokens[i] for i in accepted] + [7]  # + the bonus token
        ran.clear()
        got = drafter.propose(context, make_schedule(**shape))
        assert ran[0] == runs, accepted  # the catch-up: the bonus token (and a leaf, which was never run)
        want = fresh.propose(context, make_schedule(**shape))
        assert got.tokens == want.tokens and got.parents == want.parents
        assert torch.allclose(got.logits, want.logits, atol=1e-9, equal_nan=True)
    # a context that does not continue the tree keeps none of it
    drafter.propose(list(PROMPT), make_schedule(**shape))
    other = list(PROMPT[:-1]) + [3, 4]
    assert torch.allclose(drafter.propose(other, make_schedule(**shape)).logits,
                          fresh.propose(other, make_schedule(**shape)).logits, atol=1e-9, equal_nan=True)


def test_argmax_is_torchs_argmax():
    """tensors.argmax (numpy's, for speed) picks what torch's argmax picks: rows and single rows, float32, float64
    and bfloat16, the first index on ties, -inf masks."""
    from specert.tensors import argmax

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(6, 49152)), dtype=torch.float32)
    x[1, 7] = x[1, 300] = x[1].max() + 1  # a tie: the first index
    x[2, :100] = float("-inf")
    for values in (x, x.double(), x.bfloat16(), x[1], x[2].double()):
        assert torch.equal(argmax(values), values.argmax(-1))
    assert int(argmax(x[1])) == 7
