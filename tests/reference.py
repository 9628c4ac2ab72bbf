"""Slow, obviously-correct references for the tests: the rules read literally from THEORY.md's table, and the
certificates found by brute-force constrained minimisation with scipy (no closed form, no water-filling)."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize

from specert.theory.rules import Additive, AllOf, AnyOf, Multiplicative, Threshold, TopM, Tree, Typical


def random_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Small-vocabulary target logits covering flat, peaked, tied and masked cases (float64 [V])."""
    scale = rng.choice([0.2, 1.0, 3.0, 8.0])
    x = rng.normal(size=vocab) * scale
    kind = rng.random()
    if kind < 0.15:  # an exact tie with the top token
        x[rng.integers(1, vocab)] = x.max()
        x = np.roll(x, rng.integers(vocab))
    elif kind < 0.3 and vocab > 2:  # a masked token
        x[rng.integers(vocab)] = -np.inf
        if np.isneginf(x).all() or (np.isfinite(x).sum() < 1):
            x[0] = 0.0
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def accepted_tokens(p: np.ndarray, rule) -> np.ndarray:
    """Bool [V]: tokens the single-candidate rule accepts as the drafter's greedy token (p float64 [V])."""
    if isinstance(rule, AllOf):
        return np.logical_and.reduce([accepted_tokens(p, r) for r in rule.rules])
    if isinstance(rule, AnyOf):
        return np.logical_or.reduce([accepted_tokens(p, r) for r in rule.rules])
    if isinstance(rule, TopM):
        kth = np.sort(p)[::-1][rule.m]  # p_(m+1)
        ok = p > kth
    elif isinstance(rule, Additive):
        ok = p >= p.max() - rule.t
    elif isinstance(rule, Multiplicative):
        ok = p >= rule.alpha * p.max()
    elif isinstance(rule, Threshold):
        ok = p >= rule.tau
    elif isinstance(rule, Typical):
        h = -np.sum(p * np.log(p + rule.offset, where=p > 0, out=np.zeros_like(p)))
        ok = p > min(rule.eps, rule.delta * math.exp(-h))
    else:
        raise TypeError(rule)
    return ok & (p > 0)


def accepts(p: np.ndarray, q: np.ndarray, rule) -> np.ndarray:
    """Reference acceptance for drafters q [N, V] against one target p [V], ties against acceptance."""
    top = q == q.max(-1, keepdims=True)  # [N, V] drafter greedy tokens
    if isinstance(rule, Tree):
        x0 = p == p.max()
        # for every target greedy token, fewer than m other tokens at or above it in q
        ok = np.ones(len(q), dtype=bool)
        for x in np.flatnonzero(x0):
            ok &= (q >= q[:, x : x + 1]).sum(-1) - 1 < rule.m
        return ok
    good = accepted_tokens(p, rule)
    return ~(top & ~good).any(-1)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    s = p > 0
    return float(np.sum(p[s] * np.log(p[s] / q[s])))


def _min_kl_over_q(p: np.ndarray, constraints: list[tuple[int, int]]) -> float:
    """min KL(p || q) over the simplex subject to q[a] >= q[b] for each (a, b).

    Solved in z = log q, where it is convex with a linear objective: minimise -sum p z subject to the linear
    z[a] >= z[b] and logsumexp(z) <= 0 (tight at the optimum). Several starts, each polished twice.
    """
    v = len(p)
    s = p > 0
    const = float(np.sum(p[s] * np.log(p[s])))

    def f(z):
        return const - float(np.sum(p * z))

    def grad(z):
        return -p

    def lse(z):
        m = z.max()
        return m + math.log(np.exp(z - m).sum())

    cons = [{"type": "ineq", "fun": lambda z: -lse(z), "jac": lambda z: -np.exp(z - lse(z))}]
    for a, b in constraints:
        jac = np.zeros(v)
        jac[a], jac[b] = 1.0, -1.0
        cons.append({"type": "ineq", "fun": lambda z, a=a, b=b: z[a] - z[b], "jac": lambda z, j=jac: j})
    lifted = np.maximum(p, 1e-12)
    for a, b in constraints:
        lifted[a] = max(lifted[a], lifted[b])
    lifted /= lifted.sum()
    best = math.inf
    for q0 in (np.full(v, 1.0 / v), lifted, (1.0 / v + lifted) / 2):
        z0 = np.log(q0)
        for _ in range(3):
            res = minimize(f, z0, jac=grad, bounds=[(-40, 0)] * v, constraints=cons, method="SLSQP",
                           options={"ftol": 1e-16, "maxiter": 3000})
            z = res.x
            if all(z[a] >= z[b] - 1e-9 for a, b in constraints):
                z = z - lse(z)  # renormalise: stays feasible, objective exact
                best = min(best, f(z))
            z0 = z
    return best


def _min_kl_over_p(q: np.ndarray, x0: int) -> float:
    """min KL(p || q) over the simplex subject to p[x0] >= p[i] for all i."""
    v = len(q)

    def f(p):
        return float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(q))))

    def grad(p):
        return np.log(np.maximum(p, 1e-300)) - np.log(q) + 1

    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones(v)}]
    for i in range(v):
        if i != x0:
            jac = np.zeros(v)
            jac[x0], jac[i] = 1.0, -1.0
            cons.append({"type": "ineq", "fun": lambda p, i=i: p[x0] - p[i], "jac": lambda p, j=jac: j})
    p0 = np.full(v, 1.0 / v)
    res = minimize(f, p0, jac=grad, bounds=[(0, 1)] * v, constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    return res.fun


def brute_certificate(p: np.ndarray, rule) -> float:
    """inf { KL(p || q) : the rule rejects q }, by minimising over every way q can be rejected."""
    v = len(p)
    best = math.inf
    if isinstance(rule, Tree):
        for x0 in np.flatnonzero(p == p.max()):
            others = [j for j in range(v) if j != x0]
            for comp in itertools.combinations(others, rule.m):
                best = min(best, _min_kl_over_q(p, [(j, x0) for j in comp]))
        return best
    good = accepted_tokens(p, rule)
    for j in np.flatnonzero(~good):
        best = min(best, _min_kl_over_q(p, [(j, i) for i in range(v) if i != j]))
    return best


def brute_drafter_certificate(q: np.ndarray, m: int) -> float:
    """inf { KL(p || q) : some target greedy token is outside the drafter's top m (ties against coverage) }."""
    best = math.inf
    for x0 in range(len(q)):
        if (q >= q[x0]).sum() - 1 >= m:  # m tokens at or above x0: x0 can be left out of the top m
            best = min(best, _min_kl_over_p(q, x0))
    return best
