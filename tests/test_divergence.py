"""KL (target first) and speculative sampling's acceptance probability."""

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

import specert


def test_kl_matches_scipy_and_is_target_first(rng):
    for _ in range(100):
        x, y = rng.normal(size=7) * 2, rng.normal(size=7) * 2
        p = np.exp(x - x.max())
        p /= p.sum()
        q = np.exp(y - y.max())
        q /= q.sum()
        assert float(specert.kl(x, y)) == pytest.approx(rel_entr(p, q).sum(), rel=1e-12)
        assert float(specert.kl(y, x)) == pytest.approx(rel_entr(q, p).sum(), rel=1e-12)


def test_kl_zero_and_infinite_cases():
    assert float(specert.kl(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))) == 0.0
    assert math.isinf(float(specert.kl(torch.tensor([0.0, 1.0]), torch.tensor([0.0, -math.inf]))))
    # p(x) = 0 contributes nothing even where q(x) = 0 elsewhere
    assert math.isfinite(float(specert.kl(torch.tensor([0.0, -math.inf]), torch.tensor([0.0, 1.0]))))


def test_kl_keeps_precision_near_zero():
    x = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    y = x + torch.tensor([1e-7, 0.0, -1e-7], dtype=torch.float64)
    p = torch.softmax(x, -1)
    u = torch.log_softmax(x, -1) - torch.log_softmax(y, -1)
    second_order = 0.5 * float((p * u**2).sum() - (p * u).sum() ** 2)  # KL ~ Var_p(u)/2 for tiny u
    assert float(specert.kl(x, y)) == pytest.approx(second_order, rel=1e-5)


def test_stochastic_acceptance_and_pinsker(rng):
    x = rng.normal(size=(500, 9)) * 2
    y = x + rng.normal(size=(500, 9)) * rng.uniform(0, 3, size=(500, 1))
    acc = specert.stochastic_acceptance(x, y)
    p, q = np.exp(x) / np.exp(x).sum(-1, keepdims=True), np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    assert np.allclose(acc, np.minimum(p, q).sum(-1))
    assert (acc >= 1 - np.sqrt(specert.kl(x, y) / 2) - 1e-12).all()
    assert float(specert.stochastic_acceptance(x[0], x[0])) == pytest.approx(1.0)


def test_kl_near_a_threshold_is_float64_where_the_side_matters():
    """The schedules' fast KL: float32 away from the threshold (within 1e-5 of float64 here), float64's exact value
    near it and off the finite numbers."""
    from specert.theory.divergence import kl, kl_near

    g = torch.Generator().manual_seed(0)
    target = torch.randn(12, 49152, generator=g) * 3
    draft = target + torch.randn(12, 49152, generator=g) * 0.05
    draft[3, 7] = -torch.inf  # the target gives that token mass: KL is infinite
    exact = kl(target, draft)
    threshold = float(exact[5])
    fast = kl_near(target, draft, threshold)
    assert fast.dtype == torch.float64 and math.isinf(fast[3])
    finite = torch.isfinite(exact)
    assert torch.allclose(fast[finite], exact[finite], rtol=0, atol=1e-5)
    near = (exact - threshold).abs() <= 1e-4
    assert torch.equal(fast[near], exact[near])
    assert torch.equal(fast <= threshold, exact <= threshold)
