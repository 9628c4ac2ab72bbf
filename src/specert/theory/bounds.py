r"""Bounds on the certificate that use only a margin (THEORY.md sections 3-4).

Greedy and tree rules (``greedy`` is ``tree:1``), margin :math:`g = p_{(1)} - p_{(m+1)}`; both bounds are sharp:

- lower :math:`L_m(g)`, the infimum of :math:`C^{tree}_p(m)` over all p with that margin, attained (for any
  V >= m + 1) by

  .. math::

      p^* = (x + g/2,\; \underbrace{b, \dots, b}_{m-1},\; x - g/2), \qquad b = \sqrt{x^2 - g^2/4},

  with x in [g/2, 1/2] fixed by the total mass, 2x + (m-1) b = 1 (the middle ranks sit at the geometric mean of
  the outer two). All m+1 tokens form the water-filled group at c = 1/(m+1), so
  :math:`L_m(g) = \log(m+1) - H(p^*)`. Derivation: inf over (p, q) of KL(p || q) is a convex problem, symmetric
  in the middle ranks; the stationarity condition of the entropy in x gives b^2 = (x + g/2)(x - g/2). For m = 1
  it is :math:`kl_2((1+g)/2)`, ``kl2(a) = a log(2a) + (1-a) log(2(1-a))``; for small g it is about
  :math:`(m+1) g^2 / 4`.
- upper :math:`g \log(m+1)` (THEORY.md), approached as V grows by ``(g + e, e, ..., e)`` with the m competitors
  and the rest at e -> 0. For strict greedy (m = 1) the finite-V bound
  :math:`U_1(g, V) = s\, kl_2((1 + g/s)/2)`, ``s = (2 + (V-2) g)/V``, is attained by the flat distribution
  ``(e + g, e, ..., e)``, ``e = (1 - g)/V``. (For m >= 2 the flat distribution is *not* the finite-V maximiser:
  competitors tied with x0 stay out of the group and can cost more, so no finite-V tightening is claimed.)

Other single-candidate rules (additive, multiplicative, top-m with m > 1, typical, combinations), margin
:math:`g^* = p(x_0) - p(j^*)` to the most probable *rejected* token j*:

- lower :math:`kl_2((1+g^*)/2)`: W(p, j*) is at least the cost of lifting j* to x0 alone, a two-point
  water-filling over mass s = p(x0) + p(j*) <= 1, decreasing in s. Attained by the two-point distribution
  ((1+g*)/2, (1-g*)/2) whenever the rule rejects its runner-up.
- upper :math:`\min(g^*, \log 2)`: :math:`W \le \sum_A p_i (p_i - c)/c \le (p(x_0)/c)(c - p(j^*)) \le g^*`.
  Approached as g* -> 0 by many tokens tied at the top and j* near 0; for larger margins it is loose.

Where the rule rejects no token both bounds are ``inf``.
"""

from __future__ import annotations

import math

import torch

from specert.theory.rules import Rule, TopM, Tree
from specert.theory.rules import rule as as_rule
from specert.theory.stats import TargetStats
from specert.theory.tensors import as_logits


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, x)


def kl2(a):
    """kl2(a) = a log(2a) + (1-a) log(2(1-a)) = KL((a, 1-a) || (1/2, 1/2)), float64."""
    a = torch.as_tensor(a, dtype=torch.float64)
    return math.log(2) + _xlogx(a) + _xlogx(1 - a)


def tree_lower_bound(g, m: int):
    """L_m(g): the sharp lower bound of C^tree_p(m) (and of strict greedy for m = 1) given margin g.

    Computed from the smallest probability e = x - g/2 of the minimiser, the root of
    ``k e^2 + ((m-1)^2 g + 4h) e - h^2 = 0`` with ``k = (m-1)^2 - 4`` and ``h = 1 - g`` (the constraint
    ``2e + g + (m-1) sqrt(e (e + g)) = 1``), taken in the cancellation-free form ``2h^2 / (B + sqrt(B^2 + 4kh^2))``
    so that margins near 1 keep their precision.
    """
    g = torch.as_tensor(g, dtype=torch.float64).clamp(0, 1)
    h = 1 - g
    k = (m - 1) ** 2 - 4
    big_b = (m - 1) ** 2 * g + 4 * h
    denom = big_b + torch.sqrt((big_b**2 + 4 * k * h**2).clamp(min=0))
    e = torch.where(denom > 0, 2 * h**2 / denom, 0.0)
    a = e + g
    b = torch.sqrt(e * a)
    total = math.log(m + 1) + _xlogx(a) + _xlogx(e) + ((m - 1) * _xlogx(b) if m > 1 else 0.0)
    return total.clamp(min=0)


def tree_upper_bound(g, m: int, vocab_size: int):
    """Upper bound of C^tree_p(m) given margin g: ``g log(m+1)`` (sharp as V grows), and for m = 1 (strict greedy)
    the sharp finite-V bound ``U_1(g, V)`` attained by the flat distribution."""
    g = torch.as_tensor(g, dtype=torch.float64).clamp(0, 1)
    if m > 1:
        return g * math.log(m + 1)
    e = (1 - g) / vocab_size
    p1 = e + g
    c = (p1 + e) / 2
    return torch.special.xlogy(p1, p1 / c) + torch.special.xlogy(e, e / c)


def _is_tree_like(r: Rule) -> bool:
    """Greedy and tree rules: bounded through the margin p_(1) - p_(m+1)."""
    return isinstance(r, Tree) or (isinstance(r, TopM) and r.m == 1)


def _margin_of_stats(stats: TargetStats, r: Rule) -> torch.Tensor:
    """``[n]`` float64 margin; NaN where a single-candidate rule rejects no token."""
    if _is_tree_like(r):
        stats.ensure_top(r.m + 1)
        p = torch.exp(stats.top_logp)
        return p[:, 0] - p[:, r.m]
    j_logit, _, found = stats.most_probable_rejected(r.reject_bound(stats))  # the certificate's j*
    g = torch.exp(stats.top_logp[:, 0]) - torch.exp(j_logit.double() - stats.lse)
    return torch.where(found, g, math.nan)


def _bounds(stats: TargetStats, r: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    g = _margin_of_stats(stats, r)
    if _is_tree_like(r):
        lower, upper = tree_lower_bound(g, r.m), tree_upper_bound(g, r.m, stats.vocab_size)
    else:
        none = torch.isnan(g)
        lower = torch.where(none, math.inf, kl2((1 + g) / 2))
        upper = torch.where(none, math.inf, g.clamp(max=math.log(2)))
    return lower, upper


def _checked(target_logits, rule):
    r = as_rule(rule)
    target = as_logits(target_logits, "target_logits")
    r.validate(target.vocab_size)
    return target, r


def margin_bounds(target_logits, rule):
    """``(lower, upper)`` bounds on the certificate from a margin alone (see the module docstring).

    Args:
        target_logits: ``[..., V]`` target logits (torch or numpy, any float dtype).
        rule: a spec string or a :class:`~specert.theory.rules.Rule`.
    Returns:
        two float64 ``[...]`` arrays in the input's library, with ``lower <= certificate <= upper`` up to the
        certificate's downward rounding.
    """
    target, r = _checked(target_logits, rule)
    lower, upper = _bounds(TargetStats.of(target.values, entropy=r.needs_entropy), r)
    return target.output(lower), target.output(upper)


def margin(target_logits, rule):
    """The margin the bounds use: p_(1) - p_(m+1) for greedy and tree rules, p(x0) - p(j*) otherwise (NaN where
    the rule rejects no token). Float64 ``[...]``."""
    target, r = _checked(target_logits, rule)
    return target.output(_margin_of_stats(TargetStats.of(target.values, entropy=r.needs_entropy), r))
