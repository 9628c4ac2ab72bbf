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
"""

from __future__ import annotations

import math

from mpmath import mp, mpf

from specert.theory.rules import (
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
            e = [mp.exp(mpf(v) - mpf(top)) if v != -math.inf else mpf(0) for v in values]
            total = mp.fsum(e)
            self.p = [x / total for x in e]  # [V]
        self.order = sorted(range(len(self.p)), key=lambda i: -self.p[i])  # most probable first
        self._w: dict[int, mpf] = {}
        self._h: dict[float, mpf] = {}

    # -- the rules, on the exact p -------------------------------------------------------------------------------

    def entropy(self, offset: float) -> mpf:
        """H = -sum_x p(x) log(p(x) + offset) (offset 0: the Shannon entropy, 0 log 0 = 0)."""
        if offset not in self._h:
            with mp.workdps(DIGITS):
                off = mpf(offset)
                self._h[offset] = -mp.fsum(x * mp.log(x + off) for x in self.p if x > 0)
        return self._h[offset]

    def accepted(self, r: SingleCandidateRule) -> list[bool]:
        """Whether the rule accepts each token as the drafter's greedy token (ties against acceptance)."""
        p = self.p
        with mp.workdps(DIGITS):
            if isinstance(r, AllOf):
                parts = [self.accepted(q) for q in r.rules]
                return [all(a) for a in zip(*parts)]
            if isinstance(r, AnyOf):
                parts = [self.accepted(q) for q in r.rules]
                return [any(a) for a in zip(*parts)]
            top = p[self.order[0]]
            if isinstance(r, TopM):
                kth = p[self.order[r.m]]  # p_(m+1)
                ok = [x > kth for x in p]
            elif isinstance(r, Additive):
                floor = top - mpf(r.t)
                ok = [x >= floor for x in p]
            elif isinstance(r, Multiplicative):
                floor = mpf(r.alpha) * top
                ok = [x >= floor for x in p]
            elif isinstance(r, Threshold):
                ok = [x >= mpf(r.tau) for x in p]
            elif isinstance(r, Typical):
                tau = min(mpf(r.eps), mpf(r.delta) * mp.exp(-self.entropy(r.offset)))
                ok = [x > tau for x in p]
            else:
                raise TypeError(f"not a single-candidate rule: {r}")
            return [a and x > 0 for a, x in zip(ok, p)]

    # -- the water-fillings ----------------------------------------------------------------------------------------

    @staticmethod
    def _cost(group: list[mpf]) -> mpf:
        """sum_G p_i log(p_i / c), c the mean of p over G (0 log 0 = 0)."""
        c = mp.fsum(group) / len(group)
        return mp.fsum(x * mp.log(x / c) for x in group if x > 0)

    def fill_above(self, j: int) -> mpf:
        """W(p, j): {j} plus the tokens above the running mean, joined from the most probable."""
        if j not in self._w:
            with mp.workdps(DIGITS):
                group, total = [self.p[j]], self.p[j]
                for i in self.order:
                    if i == j:
                        continue
                    if self.p[i] * len(group) <= total:  # not above the mean: neither is any after it
                        break
                    group.append(self.p[i])
                    total += self.p[i]
                self._w[j] = self._cost(group)
        return self._w[j]

    def fill_below(self, m: int) -> mpf:
        """C_p^tree(m): x0 plus the competitors (ranks 2..m+1) below the running mean, from the least probable."""
        with mp.workdps(DIGITS):
            x0 = self.p[self.order[0]]
            group, total = [x0], x0
            for i in reversed(self.order[1 : m + 1]):
                if self.p[i] * len(group) >= total:  # not below the mean: neither is any after it
                    break
                group.append(self.p[i])
                total += self.p[i]
            return self._cost(group)

    def certificate(self, r) -> mpf:
        """The exact certificate of a rule (``mp.inf`` where it rejects no token)."""
        r = as_rule(r)
        r.validate(len(self.p))
        if isinstance(r, Tree):
            return self.fill_below(r.m)
        rejected = [i for i, ok in zip(range(len(self.p)), self.accepted(r)) if not ok]
        if not rejected:
            return mp.inf
        j = max(rejected, key=lambda i: self.p[i])  # W(p, j) decreases as p_j grows
        return self.fill_above(j)


def exact_certificate(logits, rule) -> mpf:
    """The exact certificate of ``rule`` at one row of float ``logits`` (:class:`ExactTarget`)."""
    return ExactTarget(logits).certificate(rule)
