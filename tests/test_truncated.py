"""Certificates and KL from the top K target tokens (THEORY.md section 9): every interval contains the full-vocabulary
value, exact ones equal it, and each end proved sharp is the supremum / infimum over consistent tails, checked by
brute force on tiny vocabularies (vertices of the tail polytope, scipy's SLSQP inside it) and by constructing the
extremal tail."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import specert
import specert.theory.acceptance
from specert.theory.certificates import fill_above, fill_below
from specert.theory.rules import STANDARD_RULES
from specert.theory.rules import rule as as_rule
from specert.theory.truncated import (
    Interval,
    TopK,
    _entropy_range,
    _fill_blocks,
    _Known,
    _top_stats,
    decide,
    truncated_certificate,
    truncated_certificates,
    truncated_kl,
)

RULES = list(STANDARD_RULES) + [
    "threshold:0.05",
    "threshold:0.3",
    "trtllm-relaxed",
    "vllm-relaxed",
    "medusa",
    "sglang-threshold:0.2",
    "topm:10|additive:0.1",
    "typical:0.2,0.5|greedy",
    "medusa&topm:3",
    "topm:30",
    "tree:40",
]


def lm_logits(rng, n, vocab, kind):
    """[n, V] float64 logits: Dirichlet of several concentrations, Gumbel or normal x 3 with a peaked top, Zipf-like."""
    if kind == "dirichlet":
        return np.log(rng.dirichlet(np.full(vocab, rng.choice([0.01, 0.1, 1.0])), size=n) + 1e-300)
    if kind == "gumbel":
        return rng.gumbel(size=(n, vocab)) * 3
    if kind == "peaked":
        x = rng.normal(size=(n, vocab)) * 3
        x[:, 0] += rng.uniform(0, 15, size=n)
        return x
    return -np.log(np.arange(1, vocab + 1))[None] * rng.uniform(0.5, 2, size=(n, 1)) + rng.normal(size=(n, vocab)) * 0.5


def contains(interval, full, rtol=1e-12):
    return ((interval.lower <= full * (1 + rtol)) & (full * (1 - rtol) <= interval.upper)).all()


def check_against_full(logits, ks, rules, q=None):
    full = specert.certificates(logits, rules)
    kl_full = specert.kl(logits, q) if q is not None else None
    for k in ks:
        topk = TopK.of(logits, k)
        got = truncated_certificates(topk, rules)
        for r in rules:
            spec = str(as_rule(r))
            iv, f = got[spec], full[spec]
            assert (iv.lower <= f).all() and (f <= iv.upper).all(), (spec, k)
            same = torch.isclose(iv.lower, f, rtol=1e-9, atol=0) | (torch.isinf(f) & torch.isinf(iv.lower))
            assert (same | ~iv.exact).all(), (spec, k)
            if k == logits.shape[-1]:
                assert iv.exact.all(), (spec, k)
        if q is not None:
            for draft in (q, TopK.of(q, 1), TopK.of(q, min(5, logits.shape[-1]))):
                iv = truncated_kl(topk, draft)
                assert (iv.lower <= kl_full).all() and (kl_full <= iv.upper).all(), k
            iv = truncated_kl(topk, q)
            d = decide(iv, got["greedy"])
            assert not (d.certified & (kl_full >= full["greedy"])).any()
            assert not (d.not_certified & (kl_full < full["greedy"])).any()


# --------------------------------------------------------------------------------------------------------------------
# Every interval contains the full value; exact ones equal it


@pytest.mark.parametrize("kind", ["dirichlet", "gumbel", "peaked", "zipf"])
def test_intervals_contain_the_full_vocabulary_values(kind, rng):
    vocab = 300
    logits = torch.tensor(lm_logits(rng, 48, vocab, kind))
    q = logits + torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    check_against_full(logits, [1, 2, 5, 20, 64], RULES, q)


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [50, 200, 1000, 5000])
@pytest.mark.parametrize("kind", ["dirichlet", "gumbel", "peaked", "zipf"])
def test_intervals_contain_the_full_vocabulary_values_sweep(kind, vocab, rng):
    for scale in (0.1, 1.0, 3.0):
        logits = torch.tensor(lm_logits(rng, 64, vocab, kind))
        q = logits + torch.randn(logits.shape, dtype=torch.float64) * scale
        check_against_full(logits, [k for k in (1, 2, 3, 5, 10, 20, 40, 64) if k < vocab], RULES, q)


def test_masked_targets(rng):
    """Masked tokens (p = 0) are always rejected: a tail may then hold them, and the intervals still contain C_p."""
    for share in (0.1, 0.5, 0.9):
        x = rng.normal(size=(32, 60)) * 2
        x[rng.random(x.shape) < share] = -np.inf
        x[:, 0] = 0.0
        logits = torch.tensor(x)
        assert TopK.of(logits, 3).masked
        check_against_full(logits, [1, 3, 10, 60], RULES + ["additive:0.9"], torch.randn(32, 60, dtype=torch.float64))


def test_everything_known_is_exact(rng):
    logits = torch.tensor(lm_logits(rng, 16, 12, "gumbel"))
    check_against_full(logits, [12], [r for r in RULES if not r.startswith(("topm:30", "tree:40", "topm:10"))])
    iv = truncated_kl(TopK.of(logits, 12), logits.flip(-1))
    assert iv.exact.all()
    assert torch.allclose(iv.lower, specert.kl(logits, logits.flip(-1)), rtol=1e-9)


def test_rank_rules_exact_when_their_ranks_are_known(rng):
    logits = torch.tensor(lm_logits(rng, 32, 100, "zipf"))
    topk = TopK.of(logits, 5)
    for spec, exact in [("greedy", True), ("topm:4", True), ("tree:4", True), ("topm:5", False), ("tree:5", False)]:
        iv = truncated_certificate(topk, spec)
        assert bool(iv.exact.all()) is exact, spec
        if exact:
            assert torch.allclose(iv.lower, specert.certificate(logits, spec), rtol=1e-9)


def test_threshold_rules_exact_when_the_kth_is_rejected():
    # p_(K) = 0.1 < tau = 0.2: j* is known, rank 3
    p = torch.tensor([[0.5, 0.25, 0.1, 0.05, 0.05, 0.05]], dtype=torch.float64)
    iv = truncated_certificate(TopK.of(p.log(), 3), "threshold:0.2")
    assert iv.exact.all()
    assert float(iv.lower) == pytest.approx(float(specert.certificate(p.log(), "threshold:0.2")), rel=1e-9)


def test_nothing_rejected_is_exact_infinity():
    # additive:0.6 with p_(1) < 0.6 accepts every token of positive probability: C_p = inf for every tail
    p = torch.tensor([[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]], dtype=torch.float64)
    iv = truncated_certificate(TopK.of(p.log(), 2), "additive:0.6")
    assert math.isinf(float(iv.lower)) and iv.exact.all()
    # with masking, a tail may hold a masked token, which every rule rejects: finite lower end, infinite upper
    iv = truncated_certificate(TopK(p.log()[:, :2], torch.arange(2)[None], 6, masked=True), "additive:0.6")
    assert math.isfinite(float(iv.lower)) and math.isinf(float(iv.upper)) and not iv.exact.any()
    # every tail token holds at least lo_x = T - (n-1) p_(K) = 0.1 > tau: nothing in the tail is rejected
    top = torch.log(torch.tensor([[0.3, 0.3]], dtype=torch.float64))
    iv = truncated_certificate(TopK(top, torch.arange(2)[None], 4), "threshold:0.09")
    assert math.isinf(float(iv.lower)) and iv.exact.all()


# --------------------------------------------------------------------------------------------------------------------
# Sharpness: brute force over consistent tails on tiny vocabularies


def sorted_tail_constraints(n, a_k, tau=None, accepted=0):
    """G t <= h for tails t_1 >= ... >= t_n in [0, p_(K)]; with tau: the first ``accepted`` at or above tau, the
    rest at or below it."""
    rows = []
    for i in range(n - 1):
        g = np.zeros(n)
        g[i + 1], g[i] = 1, -1
        rows.append((g, 0.0))
    rows.append((np.eye(n)[0], a_k))
    rows.append((-np.eye(n)[-1], 0.0))
    if tau is not None:
        if accepted > 0:
            rows.append((-np.eye(n)[accepted - 1], -tau))
        if accepted < n:
            rows.append((np.eye(n)[accepted], tau))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def vertices(g, h, total):
    n = g.shape[1]
    out = []
    for rows in itertools.combinations(range(len(g)), n - 1):
        a = np.vstack([g[list(rows)], np.ones(n)])
        if abs(np.linalg.det(a)) < 1e-12:
            continue
        t = np.linalg.solve(a, np.concatenate([h[list(rows)], [total]]))
        if (g @ t <= h + 1e-12).all():
            out.append(t)
    return out


def with_tail(top, tails):
    p = np.concatenate([np.broadcast_to(np.exp(top), (len(tails), len(top))), np.maximum(tails, 0)], -1)
    with np.errstate(divide="ignore"):
        return torch.tensor(np.log(p))


def piece_minimum(top, total, g, h, value, rng):
    """min of ``value`` (convex on the piece) over {G t <= h, sum t = T}, by SLSQP from several starts."""
    vs = vertices(g, h, total)
    if not vs:
        return math.inf
    best = math.inf
    for start in [np.mean(vs, 0)] + [vs[i] for i in rng.integers(0, len(vs), 2)]:
        res = minimize(
            value,
            start,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 300},
            constraints=[
                {"type": "ineq", "fun": lambda t: h - g @ t},
                {"type": "eq", "fun": lambda t: t.sum() - total},
            ],
        )
        if (g @ res.x <= h + 1e-9).all() and abs(res.x.sum() - total) < 1e-9:
            best = min(best, value(res.x))
    return best


def tiny_case(rng, vocab=None):
    vocab = vocab or int(rng.integers(3, 7))
    k = int(rng.integers(1, vocab))
    x = rng.normal(size=vocab) * rng.choice([0.1, 0.3, 1.0])
    top = np.sort(x - np.logaddexp.reduce(x))[::-1][:k].copy()
    topk = TopK(torch.tensor(top[None]), torch.arange(k)[None], vocab)
    return top, topk, float(topk.tail_mass[0]), math.exp(top[-1]), vocab - k


def brute_threshold(spec, tau, top, total, a_k, n, rng):
    """(sup over vertices, inf over pieces, some tail is all accepted) of C_p for a rule of known tau."""
    values, mins, all_accepted = [], [], False
    for accepted in range(n + 1):
        g, h = sorted_tail_constraints(n, a_k, tau, accepted)
        vs = vertices(g, h, total)
        if accepted == n:
            all_accepted |= bool(vs)
            continue
        for t in vs:  # nudge off tau to the piece's side
            t[:accepted] = np.where(np.isclose(t[:accepted], tau, rtol=0, atol=1e-13), tau * (1 + 1e-10), t[:accepted])
            t[accepted:] = np.where(np.isclose(t[accepted:], tau, rtol=0, atol=1e-13), tau * (1 - 1e-10), t[accepted:])
            values.append(t)

        def value(t, accepted=accepted):
            t = t.copy()
            t[accepted:] = np.minimum(t[accepted:], tau * (1 - 1e-12))
            return float(specert.certificate(with_tail(top, t[None]), spec)[0])

        mins.append(piece_minimum(top, total, g, h, value, rng))
    sup = float(specert.certificate(with_tail(top, np.array(values)), spec).max()) if values else -math.inf
    return sup, min(mins, default=math.inf), all_accepted


@pytest.mark.parametrize("name", ["threshold", "multiplicative", "additive"])
def test_threshold_ends_are_the_supremum_and_infimum(name, rng):
    cases = 0
    while cases < 4:
        top, topk, total, a_k, n = tiny_case(rng)
        p1 = math.exp(top[0])
        tau_wanted = rng.uniform(0.3, 1.0) * a_k  # p_(K) accepted: j* in the tail
        spec = {
            "threshold": f"threshold:{tau_wanted:.6g}",
            "multiplicative": f"multiplicative:{tau_wanted / p1:.6g}",
            "additive": f"additive:{p1 - tau_wanted:.6g}",
        }[name]
        r = as_rule(spec)
        tau = r.tau if name == "threshold" else r.alpha * p1 if name == "multiplicative" else p1 - r.t
        if not 0 < tau < a_k:
            continue
        cases += 1
        iv = truncated_certificate(topk, spec)
        sup, inf, all_accepted = brute_threshold(spec, tau, top, total, a_k, n, rng)
        lower, upper = float(iv.lower[0]), float(iv.upper[0])
        assert lower <= inf * (1 + 1e-9) and (all_accepted or sup <= upper * (1 + 1e-9))
        assert inf == pytest.approx(lower, rel=1e-6, abs=1e-10)
        if all_accepted:
            assert math.isinf(upper)
        else:
            assert sup == pytest.approx(upper, rel=1e-6, abs=1e-10)


@pytest.mark.slow
def test_threshold_ends_sweep(rng):
    for name in ("threshold", "multiplicative", "additive"):
        for _ in range(10):
            test_threshold_ends_are_the_supremum_and_infimum(name, rng)


@pytest.mark.parametrize("cases", [2, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["topm", "tree"])
def test_rank_rule_ends_past_k_are_the_supremum_and_infimum(family, cases, rng):
    for _ in range(cases):
        top, topk, total, a_k, n = tiny_case(rng)
        k = len(top)
        g, h = sorted_tail_constraints(n, a_k)
        vs = np.array(vertices(g, h, total))
        for m in range(k, k + n):
            spec = "greedy" if (family, m) == ("topm", 1) else f"{family}:{m}"
            iv = truncated_certificate(topk, spec)
            at_vertices = specert.certificate(with_tail(top, vs), spec)
            sup = float(at_vertices.max())

            def value(t, top=top, spec=spec):
                return float(specert.certificate(with_tail(top, np.clip(t, 0, None)[None]), spec)[0])

            inf = piece_minimum(top, total, g, h, value, rng)
            assert sup == pytest.approx(float(iv.upper[0]), rel=1e-7, abs=1e-12), spec
            inf = min(inf, float(at_vertices.min()))  # the infimum may sit at a vertex (ties at the top: 0)
            assert inf == pytest.approx(float(iv.lower[0]), rel=1e-6, abs=1e-10), spec


def test_lower_end_attained_by_the_even_tail():
    """Threshold rule, j* in the tail: the tail (u, w, ..., w), u = min(tau, T), w = (T - u)/(n - 1), attains the
    lower end, also where w rises above the known tokens' water level and joins the group."""
    for top, vocab, tau in [([0.5, 0.3], 4, 0.15), ([0.34, 0.33], 5, 0.2), ([0.9, 0.05], 1000, 0.02)]:
        top = np.log(np.array(top))
        topk = TopK(torch.tensor(top[None]), torch.arange(2)[None], vocab)
        total, n = float(topk.tail_mass[0]), vocab - 2
        u = min(tau, total)
        tail = np.concatenate([[u * (1 - 1e-12)], np.full(n - 1, (total - u) / (n - 1))])
        full = float(specert.certificate(with_tail(top, tail[None]), f"threshold:{tau}")[0])
        assert full == pytest.approx(float(truncated_certificate(topk, f"threshold:{tau}").lower[0]), rel=1e-9)


def test_topm_upper_end_attained():
    """topm:m past K: j at lo_r with the r - 1 tokens above it at p_(K)."""
    top = np.log(np.array([0.4, 0.1]))
    vocab, m = 12, 4
    topk = TopK(torch.tensor(top[None]), torch.arange(2)[None], vocab)
    total, n, r = float(topk.tail_mass[0]), vocab - 2, m + 1 - 2
    lo = (total - (r - 1) * 0.1) / (n - r + 1)
    tail = np.concatenate([np.full(r - 1, 0.1), np.full(n - r + 1, lo)])
    full = float(specert.certificate(with_tail(top, tail[None]), f"topm:{m}")[0])
    assert full == pytest.approx(float(truncated_certificate(topk, f"topm:{m}").upper[0]), rel=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# Pieces


def test_block_water_filling_matches_the_closed_forms(rng):
    logp = torch.tensor(np.sort(rng.normal(size=(50, 8)) * 2, -1)[:, ::-1].copy())
    logp = logp - torch.logsumexp(logp, -1, keepdim=True) + math.log(0.8)
    j = logp[:, -1] - torch.rand(50, dtype=torch.float64) * 3
    ones = torch.ones_like(logp)
    assert torch.allclose(_fill_blocks(j, logp, ones, below=False), fill_above(_top_stats(logp), j)[0], rtol=1e-12)
    assert torch.allclose(
        _fill_blocks(logp[:, 0], logp[:, 1:].flip(-1), ones[:, 1:], below=True),
        fill_below(_top_stats(logp), 7)[0],
        rtol=1e-12,
    )
    # a block of 3 equals its 3 tokens written out
    blocks = torch.cat([logp[:, :2], logp[:, 2:3]], -1)
    expanded = torch.cat([logp[:, :2], logp[:, 2:3].expand(-1, 3)], -1)
    weight = torch.tensor([1.0, 1.0, 3.0]).expand(50, -1)
    assert torch.allclose(
        _fill_blocks(j, blocks, weight, below=False),
        _fill_blocks(j, expanded, torch.ones_like(expanded), below=False),
        rtol=1e-12,
    )


@pytest.mark.parametrize("offset", [0.0, 1e-5])
def test_entropy_range_is_attained(offset):
    top = np.log(np.array([0.5, 0.2]))
    vocab = 40
    kn = _Known.of(TopK(torch.tensor(top[None]), torch.arange(2)[None], vocab))
    lo, hi = (float(x[0]) for x in _entropy_range(kn, offset))
    total, n = 0.3, vocab - 2

    def entropy(tail):
        p = np.concatenate([np.exp(top), tail])
        p = p[p > 0]
        return float(-(p * np.log(p + offset)).sum())

    heaped = np.zeros(n)
    heaped[:1] = 0.2
    heaped[1] = total - 0.2
    assert entropy(heaped) == pytest.approx(lo, abs=1e-10)
    assert entropy(np.full(n, total / n)) == pytest.approx(hi, abs=1e-10)
    for _ in range(20):  # any other consistent tail lies between
        t = np.random.default_rng(_).dirichlet(np.ones(n)) * total
        if t.max() <= 0.2:
            assert lo <= entropy(t) <= hi


# --------------------------------------------------------------------------------------------------------------------
# KL


def test_kl_ends_are_the_supremum_and_infimum(rng):
    """q known everywhere: the upper end is the largest KL over the vertices of the tail polytope (its maximum,
    KL being convex in p), the lower end the minimum over the polytope (SLSQP)."""
    for _ in range(6):
        top, topk, total, a_k, n = tiny_case(rng)
        k = len(top)
        q = torch.tensor(rng.normal(size=k + n) * 2)[None]
        iv = truncated_kl(topk, q)
        box = np.vstack([np.eye(n), -np.eye(n)]), np.concatenate([np.full(n, a_k), np.zeros(n)])
        vs = np.array(vertices(*box, total))
        sup = float(specert.kl(with_tail(top, vs), q.expand(len(vs), -1)).max())

        def value(t, top=top, q=q):
            return float(specert.kl(with_tail(top, np.clip(t, 0, None)[None]), q)[0])

        inf = piece_minimum(top, total, *box, value, rng)
        assert sup == pytest.approx(float(iv.upper[0]), rel=1e-9, abs=1e-12)
        assert inf == pytest.approx(float(iv.lower[0]), rel=1e-6, abs=1e-10)


def test_kl_with_a_truncated_drafter(rng):
    logits = torch.tensor(lm_logits(rng, 64, 200, "gumbel"))
    q = logits + torch.randn(logits.shape, dtype=torch.float64) * 2
    full = specert.kl(logits, q)
    target = TopK.of(logits, 10)
    plain = truncated_kl(target, TopK.of(q, 10))
    assert (plain.lower <= full).all() and torch.isinf(plain.upper).all() and not plain.exact.any()
    # q at the target's top token, as a served drafter's prompt log-probabilities give: never looser
    known = torch.full((64, 10), math.nan, dtype=torch.float64)
    known[:, 0] = torch.log_softmax(q, -1).gather(-1, target.ids[:, :1])[:, 0]
    more = truncated_kl(target, TopK.of(q, 10), draft_logprobs=known)
    assert (more.lower <= full).all() and (more.lower >= plain.lower - 1e-12).all()


def test_kl_truncated_drafter_with_an_empty_tail_is_exact():
    p = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    iv = truncated_kl(TopK.of(p.log(), 2), TopK.of(q.log(), 1), draft_logprobs=q.log()[:, [0, 1]])
    assert iv.exact.all()
    assert float(iv.upper[0]) == pytest.approx(float(specert.kl(p.log(), q.log())[0]), rel=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# Decisions


def test_decide_follows_its_definition():
    cert = Interval(
        torch.tensor([1.0, 1.0, 1.0, 1.0, math.inf]),
        torch.tensor([2.0, 2.0, 2.0, math.inf, math.inf]),
        torch.zeros(5, dtype=torch.bool),
    )
    kl = Interval(
        torch.tensor([0.0, 2.0, 0.5, 5.0, math.inf]),
        torch.tensor([0.99, 3.0, 1.0, 6.0, math.inf]),
        torch.zeros(5, dtype=torch.bool),
    )
    d = decide(kl, cert)
    assert d.certified.tolist() == [True, False, False, False, False]
    assert d.not_certified.tolist() == [False, True, False, False, True]
    assert d.undetermined.tolist() == [False, False, True, True, False]
    # a known KL (or a bound eps) as a number
    assert decide(0.5, cert).certified.tolist() == [True, True, True, True, True]


def test_numpy_in_numpy_out(rng):
    logits = lm_logits(rng, 6, 30, "gumbel").reshape(2, 3, 30)
    topk = TopK.of(logits, 4)
    iv = truncated_certificate(topk, "greedy")
    assert isinstance(iv.lower, np.ndarray) and iv.lower.shape == (2, 3)
    kl = truncated_kl(topk, logits[..., ::-1].copy())
    assert kl.lower.shape == (2, 3)
    assert isinstance(decide(kl, iv).certified, np.ndarray)


# --------------------------------------------------------------------------------------------------------------------
# Errors


def good():
    return torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64)), torch.tensor([[4, 7]])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logprobs=torch.zeros(1, 0, dtype=torch.float64)), "K >= 1"),
        (dict(vocab_size=1), "vocab_size must be a whole number >= 2"),
        (dict(vocab_size=10.0), "vocab_size must be a whole number"),
        (dict(logprobs=torch.log(torch.tensor([[0.3, 0.5]], dtype=torch.float64))), "sorted in descending order"),
        (dict(logprobs=torch.tensor([[math.nan, -1.0]], dtype=torch.float64)), "NaN or \\+inf"),
        (dict(logprobs=torch.tensor([[0.0, -math.inf]], dtype=torch.float64)), "pass masked=True"),
        (dict(logprobs=torch.log(torch.tensor([[0.7, 0.6]], dtype=torch.float64))), "sum to a probability of"),
        (dict(logprobs=torch.log(torch.tensor([[0.5, 0.01]], dtype=torch.float64))), "cannot fit"),
        (dict(ids=torch.tensor([[4, 4]])), "distinct"),
        (dict(ids=torch.tensor([[4, 12]])), "ids must lie in"),
        (dict(ids=torch.tensor([[4.0, 7.0]])), "whole token ids"),
        (dict(ids=torch.tensor([4, 7])), "must match"),
        (dict(logprobs=[[-0.7, -1.2]]), "logprobs must be a torch tensor or a numpy array"),
    ],
)
def test_topk_validation(change, message):
    logprobs, ids = good()
    args = dict(logprobs=logprobs, ids=ids, vocab_size=10) | change
    with pytest.raises(ValueError, match=message):
        TopK(**args)


def test_k_larger_than_v():
    with pytest.raises(ValueError, match="more than vocab_size"):
        TopK(torch.log(torch.full((1, 3), 0.3, dtype=torch.float64)), torch.tensor([[0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="1 <= k <= V = 5"):
        TopK.of(torch.zeros(2, 5), 6)


def test_entry_point_errors():
    logprobs, ids = good()
    topk = TopK(logprobs, ids, 10)
    with pytest.raises(ValueError, match="topk must be a TopK"):
        truncated_certificate(logprobs, "greedy")
    with pytest.raises(ValueError, match="must be smaller than the vocabulary size"):
        truncated_certificate(topk, "topm:10")
    with pytest.raises(ValueError, match="unknown rule"):
        truncated_certificate(topk, "greedyy")
    with pytest.raises(ValueError, match="different vocabularies"):
        truncated_kl(topk, TopK(logprobs, ids, 11))
    with pytest.raises(ValueError, match="draft_logits have 11 tokens"):
        truncated_kl(topk, torch.zeros(1, 11))
    with pytest.raises(ValueError, match="draft_logprobs is for a truncated draft"):
        truncated_kl(topk, torch.zeros(1, 10), draft_logprobs=logprobs)
    with pytest.raises(ValueError, match="draft_logprobs must have the target's shape"):
        truncated_kl(topk, topk, draft_logprobs=logprobs[:, :1])
    with pytest.raises(ValueError, match="certificate must be an Interval"):
        decide(0.1, torch.zeros(1))


def test_fallback_bound_when_too_many_vertices(rng, monkeypatch):
    """Past MAX_CANDIDATES vertices a row's upper end falls back to the rule-free bound: still sound, never below
    the sharp end."""
    import specert.theory.truncated as truncated

    x = rng.normal(size=(64, 80)) * 0.2  # flat: tail tokens join the water-filled group
    logits = torch.tensor(x)
    topk = TopK.of(logits, 3)
    rules = ["threshold:0.008", "multiplicative:0.6", "additive:0.01"]
    sharp = truncated_certificates(topk, rules)
    monkeypatch.setattr(truncated, "MAX_CANDIDATES", 0)
    loose = truncated_certificates(topk, rules)
    full = specert.certificates(logits, rules)
    for r in rules:
        assert (loose[r].upper >= sharp[r].upper).all() and (full[r] <= loose[r].upper).all()
        assert torch.equal(loose[r].lower, sharp[r].lower)


# --------------------------------------------------------------------------------------------------------------------
# Acceptance of a drafted token, and the entropy, from the top K


@pytest.mark.parametrize("kind", ["dirichlet", "gumbel", "peaked", "zipf"])
def test_decided_acceptance_is_the_full_vocabulary_verdict(kind, rng):
    """Where the top K decide whether a rule accepts a token, they decide as the full distribution does; tokens
    among the top K are always decided under rank and p_(1)-threshold rules."""
    logits = torch.as_tensor(lm_logits(rng, 40, 200, kind))
    tokens = torch.as_tensor(rng.integers(0, 6, size=40))  # mostly among the most probable few: both verdicts
    tokens = torch.argsort(logits, -1, descending=True).gather(-1, tokens[:, None])[:, 0]
    for k in (1, 3, 8, 200):
        topk = TopK.of(logits, k)
        for r in RULES:
            full = specert.theory.acceptance.tokens_accepted(logits, tokens, r)
            accepted, decided = specert.truncated_accepts(topk, tokens, r)
            assert (accepted == (full & decided)).all(), (r, k)
            if k == 200:
                assert decided.all(), (r, k)
            in_top = (topk.ids == tokens[:, None]).any(-1)
            if as_rule(r).spec in ("greedy", "additive:0.3", "multiplicative:0.1", "threshold:0.05") and k > 2:
                assert decided[in_top].all(), (r, k)


def test_entropy_interval_contains_the_entropy(rng):
    logits = torch.as_tensor(lm_logits(rng, 30, 300, "gumbel"))
    logp = torch.log_softmax(logits, -1)
    h = -(logp.exp() * logp).sum(-1)
    for k in (1, 5, 300):
        iv = specert.entropy_interval(TopK.of(logits, k))
        assert ((iv.lower <= h + 1e-9) & (h <= iv.upper + 1e-9)).all()
        assert iv.exact.all() == (k == 300)
