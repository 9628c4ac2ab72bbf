"""Exact certificates in 60-digit arithmetic (mpmath): the reference the fast float64 code must never exceed.

The logits are read as the exact binary numbers they are (float32 or float64), p = softmax of them is computed
with 60 significant digits, every rule decides on that p as THEORY.md's table says (ties against acceptance, a
masked token always rejected), and the certificates are the water-fillings of THEORY.md sections 3-4:

- a single-candidate rule: W(p, j*), j* the most probable token the rule rejects (``inf`` if it rejects none);
  the group is {j*} plus the tokens above the running mean of the group, joined in order of p, flattened to their
  mean c, at a cost of sum_G p_i log(p_i / c);
- ``tree:m``: x0 plus the competitors of ranks 2..m+1 below the running mean, joined from the least probable.

At 60 digits the rounding of every quantity lies some 40 orders of magnitude below the float64 resolution the
fast code works at, so the values here stand for the exact ones. Slow (pure Python): for small vocabularies.

Below the reference: the distributions where rounding decides most (:data:`FAMILIES`), and the comparison of the
fast certificates with the exact ones (:func:`tally`), for ``tests/test_overstatement.py`` and
``benchmarks/overstatement.py``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from mpmath import mp, mpf

from specert.theory.rules import (
    STANDARD_RULES,
    Additive,
    AllOf,
    AnyOf,
    Multiplicative,
    SingleCandidateRule,
    Threshold,
    TopM,
    Tree,
    Typical,
)
from specert.theory.rules import rule as as_rule

DIGITS = 60


class ExactTarget:
    """p = softmax(logits) of one row of float logits, exact to 60 digits, with the certificates of any rule.

    ``logits``: a sequence of Python floats (the float32 or float64 values, read exactly; -inf is a masked token).
    Costs W(p, j) and entropies are kept once computed, so that many rules on one row cost little more than one.
    """

    def __init__(self, logits):
        with mp.workdps(DIGITS):
            values = [float(v) for v in logits]
            if any(math.isnan(v) or v == math.inf for v in values):
                raise ValueError("logits must be finite or -inf")
            top = max(values)
            gaps = [mpf(v) - mpf(top) if v != -math.inf else None for v in values]  # a = l - l_1, exact
            e = [mp.exp(a) if a is not None else mpf(0) for a in gaps]  # [V] e^a, however small
            self.delta = [mp.expm1(a) if a is not None else mpf(-1) for a in gaps]  # [V] e^a - 1, exact near ties
            self.s = mp.fsum(e)  # S: p = e^a / S
            log_s = mp.log(self.s)
            self.p = [x / self.s for x in e]  # [V]
            self.logp = [a - log_s if a is not None else -mp.inf for a in gaps]  # [V], no log per token
        self.order = sorted(range(len(values)), key=lambda i: -values[i])  # most probable first (exp is monotone)
        self._w: dict[int, mpf] = {}
        self._h: dict[float, mpf] = {}

    # -- the rules, on the exact p -------------------------------------------------------------------------------

    def entropy(self, offset: float) -> mpf:
        """H = -sum_x p(x) log(p(x) + offset) (offset 0: the Shannon entropy, 0 log 0 = 0)."""
        if offset not in self._h:
            with mp.workdps(DIGITS):
                if offset == 0:
                    value = -mp.fsum(x * lp for x, lp in zip(self.p, self.logp) if x > 0)
                else:
                    value = -mp.fsum(x * mp.log(x + mpf(offset)) for x in self.p if x > 0)
                self._h[offset] = value
        return self._h[offset]

    def acceptor(self, r: SingleCandidateRule):
        """The rule's test of a token by its probability x: whether it accepts it as the drafter's greedy token
        (ties against acceptance; x = 0, a masked token, always rejected)."""
        if isinstance(r, (AllOf, AnyOf)):
            parts = [self.acceptor(q) for q in r.rules]
            join = all if isinstance(r, AllOf) else any
            return lambda x: join(a(x) for a in parts)
        with mp.workdps(DIGITS):
            top = self.p[self.order[0]]
            if isinstance(r, TopM):
                kth = self.p[self.order[r.m]]  # p_(m+1)
                return lambda x: x > kth
            if isinstance(r, Additive):
                floor = top - mpf(r.t)
            elif isinstance(r, Multiplicative):
                floor = mpf(r.alpha) * top
            elif isinstance(r, Threshold):
                floor = mpf(r.tau)
            elif isinstance(r, Typical):
                tau = min(mpf(r.eps), mpf(r.delta) * mp.exp(-self.entropy(r.offset)))
                return lambda x: x > tau and x > 0
            else:
                raise TypeError(f"not a single-candidate rule: {r}")
        return lambda x: x >= floor and x > 0

    # -- the water-fillings ----------------------------------------------------------------------------------------

    def _cost(self, group: list[int]) -> mpf:
        """sum_G p_i log(p_i / c), c the mean of p over the tokens G, as c sum_G h(p_i / c - 1) (module :func:`h`),
        with p_i / c - 1 from e^a - 1: every term >= 0, and near ties keep their relative precision."""
        delta = [self.delta[i] for i in group]
        mean = mp.fsum(delta) / len(delta)
        level = 1 + mean  # c S
        return level / self.s * mp.fsum(h((d - mean) / level) for d in delta)

    def fill_above(self, j: int) -> mpf:
        """W(p, j): {j} plus the tokens above the running mean, joined from the most probable."""
        if j not in self._w:
            with mp.workdps(DIGITS):
                group, total = [j], self.p[j]
                for i in self.order:
                    if i == j:
                        continue
                    if self.p[i] * len(group) <= total:  # not above the mean: neither is any after it
                        break
                    group.append(i)
                    total += self.p[i]
                self._w[j] = self._cost(group)
        return self._w[j]

    def fill_below(self, m: int) -> mpf:
        """C_p^tree(m): x0 plus the competitors (ranks 2..m+1) below the running mean, from the least probable."""
        with mp.workdps(DIGITS):
            x0 = self.order[0]
            group, total = [x0], self.p[x0]
            for i in reversed(self.order[1 : m + 1]):
                if self.p[i] * len(group) >= total:  # not below the mean: neither is any after it
                    break
                group.append(i)
                total += self.p[i]
            return self._cost(group)

    def certificate(self, r) -> mpf:
        """The exact certificate of a rule (``mp.inf`` where it rejects no token)."""
        r = as_rule(r)
        r.validate(len(self.p))
        if isinstance(r, Tree):
            return self.fill_below(r.m)
        # The rejected tokens form a lower level set of p: j*, the most probable of them (W(p, j) decreases as p_j
        # grows), is the first rejected in order of p; tokens tied with it are rejected too and cost the same.
        ok = self.acceptor(r)
        for j in self.order:
            if not ok(self.p[j]):
                return self.fill_above(j)
        return mp.inf


with mp.workdps(DIGITS):
    _SMALL = mpf("1e-10")
    _H_SERIES = [mpf((-1) ** k) / (k * (k - 1)) for k in range(2, 9)]  # h(d) / d^2 = sum_k c_k d^(k-2)


def h(d: mpf) -> mpf:
    """h(d) = (1 + d) log1p(d) - d >= 0 (h(-1) = 1) to 60 digits of its value: for |d| < 1e-10 by its series
    sum_{k >= 2} (-1)^k d^k / (k (k - 1)) to k = 8 (the rest below 1e-60 of it), where the closed form would
    cancel. Called at 60 digits (:func:`mp.workdps`)."""
    if d == -1:
        return mpf(1)
    if abs(d) < _SMALL:
        poly = _H_SERIES[-1]
        for c in reversed(_H_SERIES[:-1]):
            poly = poly * d + c
        return d * d * poly
    return (1 + d) * mp.log1p(d) - d


def exact_certificate(logits, rule) -> mpf:
    """The exact certificate of ``rule`` at one row of float ``logits`` (:class:`ExactTarget`)."""
    return ExactTarget(logits).certificate(rule)


# -- hard distributions ----------------------------------------------------------------------------------------------
# Each generator gives float64 logits [n, V] whose values are those of ``dtype`` (float32 or float64): the rows
# where rounding decides most, the exact certificate computed on exactly those values.

FAMILIES = ("near-tie", "point-mass", "extreme-scale", "near-threshold")


def _log_uniform(rng, lo: float, hi: float, size) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _in_dtype(x: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(dtype).astype(np.float64)


def near_tie(rng, n: int, v: int, dtype=np.float64) -> np.ndarray:
    """A top logit and up to V - 1 competitors just below it: gaps to the top and between competitors
    log-uniform in [1e-12, 1e-3], or a few units in the last place of ``dtype`` (0: an exact tie); the other tokens
    well below, one masked in a row of ten."""
    top = rng.normal(size=(n, 1)) * 4
    close = rng.integers(1, v, size=(n, 1))  # competitors near the top
    steps = _log_uniform(rng, 1e-12, 1e-3, (n, v - 1))
    ulps = rng.integers(0, 4, size=(n, v - 1)) * np.spacing(np.abs(top).astype(dtype)).astype(np.float64)
    steps = np.where(rng.random((n, 1)) < 0.3, ulps, steps)
    far = rng.exponential(rng.choice([0.5, 3.0, 20.0], size=(n, 1)), size=(n, v - 1)) + 1e-3
    rest = top - np.where(np.arange(v - 1) < close, np.cumsum(steps, -1), np.cumsum(steps, -1) + far)
    x = np.concatenate([top, rest], -1)
    masked = rng.random(n) < 0.1
    x[masked, -1] = -np.inf
    return _in_dtype(rng.permuted(x, axis=-1), dtype)


def point_mass(rng, n: int, v: int, dtype=np.float64) -> np.ndarray:
    """One logit 30 to 700 above the others, which are spread or nearly tied among themselves."""
    spread = rng.normal(size=(n, v - 1)) * 3
    others = np.where(rng.random((n, 1)) < 0.5, near_tie(rng, n, v - 1), spread) if v > 2 else spread
    lead = others.max(-1, keepdims=True) + rng.uniform(30, 700, size=(n, 1))
    return _in_dtype(rng.permuted(np.concatenate([lead, others], -1), axis=-1), dtype)


def extreme_scale(rng, n: int, v: int, dtype=np.float64) -> np.ndarray:
    """Near-tied or spread logits times 1e3, shifted by plus or minus 1e6 (float32 keeps 1/16 of a unit there)."""
    base = np.where(rng.random((n, 1)) < 0.5, near_tie(rng, n, v), rng.normal(size=(n, v)))
    shift = rng.choice([-1e6, 1e6], size=(n, 1))
    return _in_dtype(base * 1e3 + shift, dtype)


def _parts(r) -> list:
    return list(getattr(r, "rules", (r,)))


def _tau(part, p: np.ndarray) -> float:
    """The level a single rule's threshold sits at for p (float64), the probability a token rejected has at most."""
    top = p.max()
    if isinstance(part, Additive):
        return top - part.t
    if isinstance(part, Multiplicative):
        return part.alpha * top
    if isinstance(part, Threshold):
        return part.tau
    if isinstance(part, Typical):
        h = -np.sum(p * np.log(p + part.offset, where=p > 0, out=np.zeros_like(p)))
        return min(part.eps, part.delta * math.exp(-h))
    return float(np.sort(p)[::-1][part.m])  # TopM: p_(m+1)


def near_threshold(rng, n: int, v: int, rules, dtype=np.float64) -> np.ndarray:
    """A token placed at the threshold of one of the rules (a part of a combination; p_(m+1) for top-m), then moved
    by 0 to 3 units in the last place of ``dtype`` or by a relative 1e-16 to 1e-9, either way: where the rule's
    decision rests on rounding."""
    parts = [q for r in rules for q in _parts(as_rule(r)) if isinstance(q, SingleCandidateRule) and width(q) <= v]
    x = rng.normal(size=(n, v)) * rng.choice([0.3, 1.0, 3.0], size=(n, 1))
    for row in x:
        part = parts[rng.integers(len(parts))]
        j = int(rng.integers(1, v))
        row[0] = row.max() + rng.exponential(1.0)  # token 0 on top, j below it
        for _ in range(40):  # p_j = tau(p) by fixed-point iteration: tau moves little as p_j does
            p = np.exp(row - row.max())
            p /= p.sum()
            tau = _tau(part, p)
            if not 0 < tau < 1:
                break
            if isinstance(part, TopM):
                row[j] = row[np.argsort(-row)[part.m]]
                break
            rest = np.log(np.sum(np.exp(np.delete(row, j) - row.max()))) + row.max()
            row[j] = math.log(tau) - math.log1p(-tau) + rest  # p_j = tau with the others as they are
        ulp = float(np.spacing(np.abs(np.float64(row[j]).astype(dtype))))
        step = rng.integers(0, 4) * ulp if rng.random() < 0.5 else abs(row[j]) * _log_uniform(rng, 1e-16, 1e-9, ())
        row[j] += step * rng.choice([-1, 1])
    return _in_dtype(rng.permuted(x, axis=-1), dtype)


def hard_logits(family: str, rng, n: int, v: int, dtype=np.float64, rules=()) -> np.ndarray:
    """``n`` rows of ``v`` logits of a family of :data:`FAMILIES` with the values of ``dtype`` (float64 array)."""
    if family == "near-threshold":
        return near_threshold(rng, n, v, rules, dtype)
    return {"near-tie": near_tie, "point-mass": point_mass, "extreme-scale": extreme_scale}[family](rng, n, v, dtype)


# -- the comparison ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """How a rule's fast certificates compared with the exact ones."""

    cases: int = 0
    overstated: int = 0
    worst_over: float = 0.0  # largest (fast - exact) / exact where fast > exact
    example: tuple | None = None  # (logits, fast, exact) of the worst overstatement
    worst_under: float = 0.0  # largest (exact - fast) / exact, exact > 0
    worst_under_at: float = math.nan  # the exact value where it was
    worst_under_abs: float = 0.0  # largest exact - fast

    def add(self, logits, fast: float, exact) -> None:
        self.cases += 1
        if math.isnan(fast) or fast < 0:
            self.overstated += 1  # not a certificate at all: counted with the failures
            self.example = self.example or (list(logits), fast, exact)
            return
        if exact == mp.inf:
            return
        with mp.workdps(DIGITS):
            if mpf(fast) > exact:
                self.overstated += 1
                over = float((mpf(fast) - exact) / exact) if exact > 0 else math.inf
                if over >= self.worst_over:
                    self.worst_over, self.example = over, (list(logits), fast, float(exact))
                return
            under = exact - mpf(fast)
        self.worst_under_abs = max(self.worst_under_abs, float(under))
        if exact > 0 and float(under / exact) > self.worst_under:
            self.worst_under, self.worst_under_at = float(under / exact), float(exact)


def width(r) -> int:
    """The least vocabulary the rule takes: m + 1 for its widest top-m or tree part, else 2."""
    return max([2] + [q.m + 1 for q in _parts(as_rule(r)) if isinstance(q, (TopM, Tree))])


def compare(logits: np.ndarray, rules, dtype, tallies: dict[str, Tally]) -> None:
    """Fast certificates of ``logits`` [n, V] (cast to ``dtype``, float32 or float64) against the exact ones of the
    same values, for every rule the vocabulary takes; counted into ``tallies`` by spec."""
    import torch

    import specert

    rules = [as_rule(r) for r in rules]
    rules = [r for r in rules if width(r) <= logits.shape[-1]]
    fast = specert.certificates(torch.from_numpy(logits.astype(dtype)), rules)
    for i, row in enumerate(logits):
        target = ExactTarget(row)
        for r in rules:
            tallies.setdefault(r.spec, Tally()).add(row, float(fast[r.spec][i]), target.certificate(r))


# -- the rules and the rows compared -------------------------------------------------------------------------------

PRESETS = ("trtllm-relaxed", "vllm-relaxed", "sglang-threshold:0.3", "medusa")
# Every standard rule, a threshold rule and the engines' presets, by canonical spec (trtllm-relaxed is the
# standard topm:10&additive:0.6).
RULES = tuple(dict.fromkeys(str(as_rule(s)) for s in (*STANDARD_RULES, "threshold:0.2", *PRESETS)))
# Vocabulary sizes: the wide ones (V > 10, which topm:10 needs; V = 24 has more tokens than the 16 top ones gathered
# by default) get twice the rows of the narrow ones.
NARROW, WIDE = (2, 3, 5, 8), (11, 13, 16, 24)


def vocabulary_rows(cases: int) -> dict[int, int]:
    """Rows per vocabulary size so that every rule of :data:`RULES` gets at least ``cases`` of them."""
    return {v: math.ceil(cases / len(WIDE)) if v in WIDE else math.ceil(cases / (2 * len(NARROW)))
            for v in NARROW + WIDE}


def tally(family: str, dtype, cases: int, seed: int = 0, rules=RULES, progress=None) -> dict[str, Tally]:
    """At least ``cases`` rows of ``family`` in ``dtype`` for every rule, compared with the exact certificates
    (in blocks of at most 1000 rows; ``progress(v, rows)`` after each)."""
    rng = np.random.default_rng([zlib.crc32(family.encode()), np.dtype(dtype).itemsize, cases, seed])
    out: dict[str, Tally] = {}
    for v, rows in vocabulary_rows(cases).items():
        for start in range(0, rows, 1000):
            n = min(1000, rows - start)
            compare(hard_logits(family, rng, n, v, dtype, rules), rules, dtype, out)
            if progress is not None:
                progress(v, n)
    return out
