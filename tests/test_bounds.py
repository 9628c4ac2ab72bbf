"""Margin bounds: they hold, and the sharp ones are attained (THEORY.md sections 3-4)."""

import math

import numpy as np
import pytest
import torch

import specert
from reference import random_logits
from specert.theory.bounds import kl2, tree_lower_bound, tree_upper_bound


def _logits(p):
    return torch.tensor(np.log(np.asarray(p, dtype=np.float64)))


@pytest.mark.parametrize("spec", ["greedy", "tree:2", "tree:3", "tree:5", "additive:0.1", "additive:0.3",
                                  "multiplicative:0.5", "multiplicative:0.1", "topm:2", "topm:4",
                                  "typical:0.09,0.3", "topm:10&additive:0.6"])
def test_bounds_hold(spec, rng):
    for vocab in (12, 40):
        x = torch.tensor(np.stack([random_logits(rng, vocab) for _ in range(3000)]))
        c = specert.certificate(x, spec)
        lower, upper = specert.margin_bounds(x, spec)
        finite = torch.isfinite(c)
        assert torch.equal(finite, torch.isfinite(lower)) and torch.equal(finite, torch.isfinite(upper))
        assert (lower[finite] <= c[finite] * (1 + 1e-9) + 1e-15).all()
        assert (c[finite] <= upper[finite] * (1 + 1e-9) + 1e-15).all()


def test_greedy_bounds_attained():
    for g in (0.01, 0.2, 0.5, 0.9):
        two_point = _logits([(1 + g) / 2, (1 - g) / 2])
        assert float(specert.certificate(two_point, "greedy")) == pytest.approx(float(kl2((1 + g) / 2)), rel=1e-9)
        vocab = 50
        e = (1 - g) / vocab
        flat = _logits([e + g] + [e] * (vocab - 1))
        upper = float(tree_upper_bound(g, 1, vocab))
        assert float(specert.certificate(flat, "greedy")) == pytest.approx(upper, rel=1e-9)
        s = (2 + (vocab - 2) * g) / vocab
        assert upper == pytest.approx(s * float(kl2((1 + g / s) / 2)), rel=1e-12)
        assert upper <= g * math.log(2)
    # the V-free bound g log 2 is approached as V grows
    assert float(tree_upper_bound(0.3, 1, 10**9)) == pytest.approx(0.3 * math.log(2), rel=1e-6)
    assert float(kl2(0.5005)) == pytest.approx(0.001**2 / 2, rel=1e-3)  # small margins: C >= g^2 / 2


def _tree_minimiser(g, m):
    """THEORY's lower-bound distribution, built independently of specert.theory.bounds from its stationarity
    condition."""
    from scipy.optimize import brentq

    if m == 1:
        return np.array([(1 + g) / 2, (1 - g) / 2])
    x = brentq(lambda x: ((1 - 2 * x) / (m - 1)) ** 2 - (x * x - g * g / 4), g / 2 + 1e-300, 0.5)
    b = (1 - 2 * x) / (m - 1)
    return np.array([x + g / 2] + [b] * (m - 1) + [x - g / 2])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_tree_lower_bound_is_attained_and_not_beaten_by_random_search(m, rng):
    for g in (0.02, 0.1, 0.4, 0.8, 0.99):
        p = _tree_minimiser(g, m)
        assert p[0] - p[m] == pytest.approx(g)
        attained = float(specert.certificate(_logits(p), f"tree:{m}"))
        assert attained == pytest.approx(float(tree_lower_bound(g, m)), rel=1e-8, abs=1e-14)
        # local search around the minimiser (and with extra tail tokens) never finds a cheaper p for its margin
        for _ in range(300):
            q = np.concatenate([p, np.full(int(rng.integers(0, 4)), 1e-9)])
            q = np.abs(q * np.exp(rng.normal(size=len(q)) * 10 ** rng.uniform(-4, -1)))
            q /= q.sum()
            s = np.sort(q)[::-1]
            c = float(specert.certificate(_logits(q), f"tree:{m}"))
            assert c >= float(tree_lower_bound(s[0] - s[m], m)) * (1 - 1e-9) - 1e-15
    # small margins: about (m + 1) g^2 / 4
    assert float(tree_lower_bound(1e-3, m)) == pytest.approx((m + 1) * 1e-6 / 4, rel=1e-2)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_tree_random_search_over_dirichlet(m, rng):
    """Broad random search: no distribution beats the lower bound or exceeds the upper bound for its margin."""
    vocab = m + 6
    for alpha in (0.05, 0.3, 1.0, 5.0):
        p = rng.dirichlet(np.full(vocab, alpha), size=4000)
        x = torch.tensor(np.log(np.maximum(p, 1e-300)))
        c = specert.certificate(x, f"tree:{m}")
        s = np.sort(p, -1)[:, ::-1]
        g = torch.tensor(s[:, 0] - s[:, m])
        assert (c >= tree_lower_bound(g, m) * (1 - 1e-9) - 1e-15).all()
        assert (c <= tree_upper_bound(g, m, vocab) * (1 + 1e-9) + 1e-15).all()


@pytest.mark.parametrize("m", [2, 4])
def test_tree_upper_bound_approached_as_vocabulary_grows(m):
    g = 0.5
    gaps = []
    for vocab in (100, 10_000, 1_000_000):
        e = (1 - g) / vocab
        flat = _logits([g + e] + [e] * (vocab - 1))
        gaps.append(float(tree_upper_bound(g, m, vocab)) - float(specert.certificate(flat, f"tree:{m}")))
    assert all(gap >= 0 for gap in gaps) and gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3 * g * math.log(m + 1)


def test_relaxed_rule_lower_bound_attained_by_two_point():
    g = 0.4  # additive:0.1 rejects the runner-up of ((1+g)/2, (1-g)/2) since g > 0.1
    x = _logits([(1 + g) / 2, (1 - g) / 2])
    lower, upper = specert.margin_bounds(x, "additive:0.1")
    assert float(lower) == pytest.approx(float(specert.certificate(x, "additive:0.1")), rel=1e-9)
    assert float(specert.margin(x, "additive:0.1")) == pytest.approx(g)
    # relaxed upper bound min(g*, log 2) is approached for small margins: many tokens tied at the top, j* near 0
    k, eps = 400, 1e-12
    x = _logits([1 / k - eps / k] * k + [eps])
    c = float(specert.certificate(x, "multiplicative:0.5"))
    assert c == pytest.approx(float(specert.margin(x, "multiplicative:0.5")), rel=0.01)


def test_no_rejected_token_gives_infinite_bounds():
    x = _logits([0.3, 0.3, 0.4])
    lower, upper = specert.margin_bounds(x, "additive:0.5")
    assert math.isinf(float(lower)) and math.isinf(float(upper))
