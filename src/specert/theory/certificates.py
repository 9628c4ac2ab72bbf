"""Exact acceptance certificates (THEORY.md sections 2-4 and 7).

The certificate of a rule at target distribution p is

    C_p = inf { KL(p || q) : q in R_p },

the smallest KL(p || q) at which a drafter q can be rejected (``inf`` when no drafter can). Below it every draft is
accepted. All three closed forms are water-fillings: a group of tokens is flattened to one level c, which costs

    cost(G) = sum_{i in G} p_i log(p_i / c),   c = mean of p over G            (arithmetic, sections 3-4)

on the target side and ``-log(1 - sum_G q_i + |G| GM)``, GM the geometric mean of q over G, on the drafter side
(section 7). Each needs a handful of top tokens: :func:`certificates` gathers them, the normaliser and the entropy
for any set of rules in one pass over the vocabulary (:func:`specert.theory.stats.gather`), never a full sort.

Numerics (a certificate may understate, never overstate the exact value of the distribution the logits define):

- costs are sums of non-negative terms ``c * h(d_i)``, ``h(d) = (1 + d) log1p(d) - d``, ``d_i = p_i / c - 1``,
  with every d_i computed from differences of logits (``expm1`` of gaps to the top, exact near ties) and h from its
  series below |d| = 1/16, where the closed form cancels (:func:`h`): near-ties keep their relative precision;
- group membership is decided with a margin that leaves out a token within rounding of the water level (leaving
  a token out never raises the cost);
- the rules' reject levels are taken at the upper end of their rounding bracket
  (:meth:`~specert.theory.rules.SingleCandidateRule.reject_range`): a token the exact rule might reject counts as
  rejected;
- results are float64, rounded *down* by a relative bound on their rounding error (:func:`cost_rtol`), at least
  ``CERTIFICATE_RTOL`` of the compute dtype.

One module: the certificates, the extremal drafter and the drafter-side certificate are one water-filling over
sorted prefix sums (``_prefix``, :func:`water_fill`, ``_parts``), rounded down one way (:func:`round_down`); split,
each would import the others' privates.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from specert.theory.rules import Rule, SingleCandidateRule, TopM, Tree, Typical
from specert.theory.rules import rule as as_rule
from specert.theory.stats import DEFAULT_TOP, TargetStats, gather, unit_roundoff
from specert.theory.tensors import argmax, as_logits, check_top, map_blocks

# Least relative downward rounding by compute dtype: float32 inputs carry about 1e-7 relative error in their
# normaliser (a bound of 4.7e-6 at V = 150k: :func:`specert.theory.stats.normaliser_rtol`).
CERTIFICATE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
_U = unit_roundoff(torch.float64)


def round_down(value: torch.Tensor, dtype: torch.dtype, rtol: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Shrink a non-negative certificate by ``max(rtol, CERTIFICATE_RTOL[dtype])`` relative (``inf`` stays ``inf``)."""
    if isinstance(rtol, torch.Tensor):
        return value * (1.0 - rtol.clamp(min=CERTIFICATE_RTOL[dtype]))
    return value * (1.0 - max(rtol, CERTIFICATE_RTOL[dtype]))


# h(d) / d^2 = sum_{k >= 2} (-1)^k d^(k-2) / (k (k-1)): for |d| <= 1/16 the terms after k = 13 sum to less than
# (1/16)^12 / (14 * 13 (1 - 1/16)) < 2.1e-17, below 0.1 u of h(d) / d^2 >= 0.489.
_H_SERIES = tuple((-1) ** k / (k * (k - 1)) for k in range(2, 14))
_H_SMALL = 1 / 16


def h(d: torch.Tensor) -> torch.Tensor:
    """h(d) = (1 + d) log1p(d) - d >= 0 for d >= -1 (h(-1) = 1), float64, within 110 u of its value.

    The closed form subtracts d from (1 + d) log1p(d) ~ d + d^2 / 2: for |d| <= 1/16 it would lose about
    log2(4 / |d|) bits, so the series above is summed there (5 u: Horner on decreasing alternating terms); above,
    the closed form's three roundings are amplified by (1 + d) log1p(d) / h(d) <= 34.
    """
    small = d.abs() <= _H_SMALL
    x = torch.where(small, d, 0.0)
    poly = torch.full_like(d, _H_SERIES[-1])
    for c in reversed(_H_SERIES[:-1]):
        poly = poly * x + c
    closed = torch.where(d > -1, (1 + d) * torch.log1p(d.clamp(min=-1)) - d, 1.0)
    return torch.where(small, x * x * poly, closed)


def _prefix(include: torch.Tensor) -> torch.Tensor:
    """Keep the leading run of True in each row of a bool ``[n, k]`` tensor."""
    return include.int().cumprod(-1).bool()


def cost_rtol(log_s_rtol: float, weight: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    r"""Bound on the relative rounding error of a :func:`water_fill` cost, float64 ``[n]``.

    With a_i the gaps to the top logit (exact, or within u |a_i|), delta_i = expm1(a_i) is within (2 + |a_i|) u
    of its value, their weighted mean within (G + 3) u max |delta|, and so is each d_i relative to the spread
    M = max |delta| / (1 + mean delta), where G is the number of candidates. The top and the anchor are both in
    a group of non-zero cost and M apart in d, so sum_G w h(d_i) >= M^2 / 4, while the first-order error is
    sum_G w |log1p(d_i)| |delta d_i| <= (G + 5) u M sqrt(2 W sum_G w h(d_i)) (Cauchy-Schwarz, W = sum_G w): a
    relative error of 2 sqrt(2 W) (G + 5) u. Add h's 110 u, the sums' and the prefactor's few u, and the
    normaliser's relative error ``log_s_rtol``.
    """
    g = weight.shape[-1] + 1
    w = 1 + torch.where(member, weight, 0.0).sum(-1)
    return log_s_rtol + (2 * torch.sqrt(2 * w) * (g + 5) + 128) * _U


def water_fill(anchor, values, weight, log_s, below: bool, upper: bool = False):
    r"""The water-filling of THEORY.md sections 3-4 over candidates given as blocks of tied tokens.

    Above (``below=False``): W(p, j), the anchor is j, the candidates join from the most probable while above the
    running mean of the group (and above j). Below (``below=True``): the tree's cost, the anchor is x0, the
    competitors join from the least probable while below it. Either way the group (anchor and joined candidates) is
    flattened to its mean c at a cost of sum_G w_i p_i log(p_i / c) = c sum_G w_i h(p_i / c - 1).

    Args:
        anchor: ``[n]`` float64, a = log p - log p_(1) of the anchor (the gap of its logit to the top logit).
        values: ``[n, G]`` float64, the gaps a of the candidates in joining order (-inf: probability 0).
        weight: ``[n, G]`` float64, how many tied tokens each candidate stands for (0: none, padding).
        log_s: ``[n]`` float64, log S with p = exp(a) / S.
        below: the direction.
        upper: decide membership within rounding towards a larger cost (for upper ends of intervals:
            :mod:`specert.theory.truncated`); by default towards a smaller one.
    Returns:
        ``(cost [n], member [n, G] bool, log_c [n])``, log_c the log of the flattened level in log p.

    A block joins whole: its tokens tie, and the running mean stays on the same side of them as they join. Every
    group holds the top token (a = 0) or the anchor alone, so d_i = (delta_i - mean delta) / (1 + mean delta),
    delta = expm1(a), is exact near ties, where p_i / c - 1 computed from probabilities would cancel.
    """
    e_anchor, e = torch.exp(anchor), torch.exp(values)  # [n], [n, G]
    we = weight * e
    zero = torch.zeros_like(we[:, :1])
    mass_before = torch.cat([zero, torch.cumsum(we, -1)[:, :-1]], -1)  # sum over earlier candidates, no subtraction
    count_before = torch.cat([zero, torch.cumsum(weight, -1)[:, :-1]], -1)
    before = (e_anchor[:, None] + mass_before) / (1 + count_before)  # [n, G] running mean before each candidate
    tol = 4 * (values.shape[-1] + 4) * _U * (-1 if upper else 1)  # beyond the rounding of e and of the mean
    if below:
        joins = e < before * (1 - tol)
    else:
        joins = (e > before * (1 + tol)) & (values > anchor[:, None])
    member = _prefix(joins | (weight == 0)) & (weight > 0)  # [n, G]
    w = torch.where(member, weight, 0.0)
    delta, delta_anchor = torch.expm1(values), torch.expm1(anchor)
    total = 1 + w.sum(-1)  # [n]
    mean = (delta_anchor + (w * torch.where(member, delta, 0.0)).sum(-1)) / total  # [n] mean delta over the group
    level = 1 + mean  # mean exp(a) over the group
    d = (torch.where(member, delta, 0.0) - mean[:, None]) / level[:, None]  # [n, G]
    spreads = h(torch.cat([((delta_anchor - mean) / level)[:, None], d], -1))  # [n, 1 + G]: anchor, candidates
    spread = spreads[:, 0] + (w * spreads[:, 1:]).sum(-1)
    cost = level * torch.exp(-log_s) * spread
    return cost, member, torch.log1p(mean) - log_s


def _gaps(stats: TargetStats, logits: torch.Tensor) -> torch.Tensor:
    """a = l - l_1, float64, for logits ``[n, ...]`` of the rows of ``stats``."""
    return logits.double() - stats.top_logits[:, :1].double().reshape((-1,) + (1,) * (logits.ndim - 1))


def fill_above(stats: TargetStats, j_logit: torch.Tensor, upper: bool = False):
    """W(p, j) = min { KL(p || q) : q_j >= q_i for all i } (THEORY.md section 3), by :func:`water_fill`.

    The group is {j} plus A, the tokens above the running mean c, grown in order of p (more top tokens are
    gathered where it runs past them). Returns ``(cost [n], member [n, k] over the top tokens, log_c [n])``.
    """
    while True:
        values = stats.top_gaps  # [n, k]
        cost, member, log_c = water_fill(_gaps(stats, j_logit), values, torch.ones_like(values), stats.log_s,
                                         below=False, upper=upper)
        if stats.k == stats.vocab_size or not member[:, -1].any():
            return cost, member, log_c
        stats.ensure_top(4 * stats.k)  # the group runs past the gathered tokens: gather more


def fill_below(stats: TargetStats, m: int, upper: bool = False):
    """C_p^tree(m) (THEORY.md section 4): x0 plus the competitors (ranks 2..m+1) below the running mean.

    Returns ``(cost [n], member [n, m+1] over ranks 1..m+1, log_c [n])``.
    """
    stats.ensure_top(m + 1)
    rising = stats.top_gaps[:, 1 : m + 1].flip(-1)  # competitors from the smallest: ranks m+1, m, ..., 2
    cost, joined, log_c = water_fill(torch.zeros_like(stats.log_s), rising, torch.ones_like(rising), stats.log_s,
                                     below=True, upper=upper)
    member = torch.cat([torch.ones_like(joined[:, :1]), joined.flip(-1)], -1)
    return cost, member, log_c


def _single_costs(stats: TargetStats, rejected) -> torch.Tensor:
    """C_p = W(p, j*) of several single-candidate rules at once: ``rejected`` their j* (:class:`Rejected`), one
    per rule. Returns ``[R, n]`` float64, rounded down; ``inf`` where a rule rejects nothing."""
    n, k = stats.top_logits.shape
    count = len(rejected)
    j_logit = torch.stack([r.logit for r in rejected]).reshape(-1)  # [R n]
    anchor = _gaps(stats, j_logit.reshape(count, n).T).T.reshape(-1)
    values = stats.top_gaps.expand(count, n, k).reshape(-1, k)  # [R n, k]
    log_s = stats.log_s.expand(count, n).reshape(-1)
    ones = torch.ones_like(values)
    cost, member, _ = water_fill(anchor, values, ones, log_s, below=False)
    rtol = cost_rtol(stats.s_rtol, ones, member)
    past = member[:, -1] if k < stats.vocab_size else torch.zeros_like(member[:, -1])
    if past.any():  # a group runs past the gathered tokens (flat rows): gather more for those rows only
        idx = past.nonzero()[:, 0]
        rows = idx % n
        sub = TargetStats(stats.logits[rows], stats.top_logits[rows], stats.top_index[rows], stats.log_s[rows],
                          stats.s_rtol)
        sub.ensure_top(4 * k)
        sub_cost, sub_member, _ = fill_above(sub, j_logit[idx])
        cost[idx] = sub_cost
        rtol[idx] = cost_rtol(stats.s_rtol, torch.ones_like(sub_member, dtype=torch.float64), sub_member)
    found = torch.stack([r.found for r in rejected]).reshape(-1)
    cost = torch.where(found, round_down(cost, stats.logits.dtype, rtol), math.inf)
    return cost.reshape(count, n)


def _tree_costs(stats: TargetStats, widths: list[int]) -> torch.Tensor:
    """C_p^tree(m) for several widths m at once: ``[len(widths), n]`` float64, rounded down."""
    n = len(stats.log_s)
    widest = max(widths)
    stats.ensure_top(widest + 1)
    gaps = stats.top_gaps[:, 1 : widest + 1]  # [n, M] ranks 2..M+1
    values, weight = [], []
    for m in widths:  # competitors from the smallest, then padding (weight 0) up to the widest
        pad = torch.full((n, widest - m), -math.inf, dtype=torch.float64, device=gaps.device)
        values.append(torch.cat([gaps[:, :m].flip(-1), pad], -1))
        weight.append(torch.cat([torch.ones_like(gaps[:, :m]), torch.zeros_like(pad)], -1))
    values, weight = torch.cat(values), torch.cat(weight)  # [T n, M]
    log_s = stats.log_s.repeat(len(widths))
    cost, member, _ = water_fill(torch.zeros_like(log_s), values, weight, log_s, below=True)
    cost = round_down(cost, stats.logits.dtype, cost_rtol(stats.s_rtol, weight, member))
    return cost.reshape(len(widths), n)


def _parts(r: Rule):
    return getattr(r, "rules", (r,))


def _widest(rules) -> int:
    """How many top tokens the rank rules among ``rules`` read (ranks 1..m+1), at least the default."""
    ms = [p.m for r in rules for p in _parts(r) if isinstance(p, (TopM, Tree))]
    return max([DEFAULT_TOP - 1] + ms) + 1


def _of_stats(stats: TargetStats, rules: list[Rule], rejected) -> dict:
    """Certificates ``[n]`` by spec from statistics whose ``rejected`` holds j* of each single-candidate rule."""
    out = {}
    single = [r for r in rules if isinstance(r, SingleCandidateRule)]
    if single:
        out.update(zip([r.spec for r in single], _single_costs(stats, rejected)))
    trees = [r for r in rules if isinstance(r, Tree)]
    if trees:
        out.update(zip([r.spec for r in trees], _tree_costs(stats, [r.m for r in trees])))
    return out


def certificates(target_logits, rules) -> dict:
    """Certificates of several rules at once, from one pass over the vocabulary.

    The pass (:func:`~specert.theory.stats.gather`) reads each block of rows once, and while it is in cache finds
    the top tokens every rule reads, the normaliser, the entropy (if a rule needs it) and, only in the rows where
    a rule rejects none of the top tokens, the most probable token it rejects. Every cost is then computed on
    ``[N, k]`` tensors for all rules together. Computed where the logits live (a CUDA tensor stays on its GPU),
    in float64 only for the few values per row that need it.

    Args:
        target_logits: ``[..., V]`` target logits or log-probabilities (torch or numpy, any float dtype).
        rules: spec strings or :class:`~specert.theory.rules.Rule` objects.
    Returns:
        a dict from each rule's spec string to its float64 ``[...]`` certificate (see :func:`certificate`).
    """
    parsed = list(dict.fromkeys(as_rule(r) for r in rules))
    target = as_logits(target_logits, "target_logits", check_values=False)
    for r in parsed:
        r.validate(target.vocab_size)
    single = [r for r in parsed if isinstance(r, SingleCandidateRule)]
    offsets = {p.offset for r in single for p in _parts(r) if isinstance(p, Typical)}
    stats = gather(target.values, _widest(parsed), offsets, [r.reject_bound for r in single])
    check_top(stats.top_logits[:, 0], "target_logits")
    certs = _of_stats(stats, parsed, stats.rejected)
    return {r.spec: target.output(certs[r.spec]) for r in parsed}


def certificate(target_logits, rule):
    r"""Exact certificate C_p of an acceptance rule (THEORY.md sections 2-4).

    .. math::

        C_p = \inf \{ KL(p \| q) : q \in R_p \}

    For single-candidate rules (greedy, additive, multiplicative, top-m, typical and their combinations)
    ``C_p = W(p, j*)`` with j* the most probable token the rule rejects and

    .. math::

        W(p, j) = \sum_{i \in A \cup \{j\}} p_i \log(p_i / c),  \quad c = \text{mean of } p \text{ over } A \cup \{j\},

    A the tokens above c. For ``tree:m`` the group is x0 plus the competitors of ranks 2..m+1 below c.
    Strict greedy reduces to ``p1 log(2 p1 / (p1 + p2)) + p2 log(2 p2 / (p1 + p2))``.

    ====================================  =============================================
    case                                  result
    ====================================  =============================================
    the rule rejects no token             ``inf``
    two tied top tokens, greedy           ``0``
    point mass, single-candidate rule     ``log 2`` (the supremum)
    point mass, ``tree:m``                ``log(m + 1)``
    ====================================  =============================================

    Args:
        target_logits: ``[..., V]`` target logits or log-probabilities (torch or numpy, any float dtype).
        rule: a spec string or a :class:`~specert.theory.rules.Rule`.
    Returns:
        float64 ``[...]`` in the input's library, rounded down (it may understate, never overstate: see the module's
        numerics).

    >>> import torch
    >>> p1, p2 = 0.7, 0.3
    >>> c = certificate(torch.tensor([p1, p2]).log(), "greedy").item()
    >>> abs(c - (p1 * math.log(2 * p1) + p2 * math.log(2 * p2))) < 1e-6
    True
    """
    r = as_rule(rule)
    return certificates(target_logits, [r])[r.spec]


def extremal_drafter(target_logits, rule):
    """Log-probabilities of a drafter q* on the rejection boundary with KL(p || q*) = C_p.

    q* = p except on the water-filled group, which is flattened to its mean c; the group's tokens then tie for
    the drafter's top (single-candidate rules: j* ties the drafter's argmax, so the draft is rejected under the
    worst-case tie convention) or x0 ties m competitors (tree rules). Rows where the rule rejects nothing
    (certificate ``inf``) are NaN. The ties are exact in float64, so q* lies in the rejection region and its exact
    KL(p || q*) is at least the certificate.

    Returns:
        float64 ``[..., V]`` log-probabilities in the input's library.
    """
    r = as_rule(rule)
    target = as_logits(target_logits, "target_logits")
    r.validate(target.vocab_size)

    def block(logits):
        single = isinstance(r, SingleCandidateRule)
        stats = gather(logits, _widest([r]), [p.offset for p in _parts(r) if isinstance(p, Typical)],
                       [r.reject_bound] if single else [], with_index=True)
        logp = torch.log_softmax(logits.double(), -1)  # [n, V]
        if not single:
            _, member, log_c = fill_below(stats, r.m)
            index = stats.top_index[:, : r.m + 1]
            # Competitors left out of the group sit at or above c: keep them there exactly.
            floor = torch.where(member, log_c[:, None], torch.maximum(logp.gather(-1, index), log_c[:, None]))
            q = logp.scatter(-1, index, floor)
            found = torch.ones_like(log_c, dtype=torch.bool)
        else:
            j = stats.rejected[0]
            found = j.found
            _, member, log_c = fill_above(stats, j.logit)
            q = torch.minimum(logp, log_c[:, None])  # nobody may stand above the group
            q = q.scatter(-1, stats.top_index, torch.where(member, log_c[:, None], q.gather(-1, stats.top_index)))
            q = q.scatter(-1, j.index[:, None], log_c[:, None])
        q = torch.log_softmax(q, -1)
        return torch.where(found[:, None], q, math.nan)

    return target.output(map_blocks(block, target.values))


def drafter_certificate(draft_logits, m: int = 1):
    r"""Drafter-side certificate D_q(m) (THEORY.md section 7).

    .. math::

        D_q(m) = \inf \{ KL(p \| q) : \arg\max p \notin \text{top-}m(q) \}
               = -\log\Big(1 - \sum_{i \in G} q_i + |G| \cdot GM\Big),

    with G = A + {j}, j the (m+1)-th most probable token of q, GM the geometric mean of q over G and A the top-m
    tokens above the running GM. If a target is within KL eps of the drafter and ``D_q(m) > eps``, the drafter's
    top-m tokens hold the target's greedy token. It needs only the drafter, so it is known before verification.

    ============================================  ===========
    case                                          result
    ============================================  ===========
    q_(m) == q_(m+1) (a tie at the cut)           ``0``
    q has at most m tokens of non-zero mass       ``inf``
    q concentrating on one token (m = 1)          grows without bound
    ============================================  ===========

    For m = 1 the group is the top two tokens and the certificate has the closed form of
    :func:`top1_certificates`, computed without a ``topk`` (what a certified chain asks at every position).

    Args:
        draft_logits: ``[..., V]`` drafter logits (torch or numpy, any float dtype).
        m: the width of the drafter's candidate set, 1 <= m < V.
    Returns:
        float64 ``[...]``, rounded down.
    """
    draft = as_logits(draft_logits, "draft_logits")
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m < draft.vocab_size:
        raise ValueError(f"m must be a whole number with 1 <= m < V = {draft.vocab_size}, got {m!r}")
    if m == 1:
        return draft.output(map_blocks(top1_certificates, draft.values))
    return draft.output(map_blocks(lambda block: _drafter_certificate_group(block, m), draft.values))


def _drafter_certificate_group(logits: torch.Tensor, m: int) -> torch.Tensor:
    """D_q(m) of logits ``[n, V]`` by the group construction of :func:`drafter_certificate` (any m)."""
    stats = gather(logits, k=m + 1)  # the drafter's top m + 1: all that D_q(m) needs
    gaps = stats.top_gaps[:, : m + 1]  # [n, m+1] log q_i - log q_1, exact near ties
    j = gaps[:, m]
    top = gaps[:, :m]
    # Running mean of log q over the group before adding top token i: (log q_j + sum_{l<i} log q_l) / (i + 1).
    arange = torch.arange(1, m + 1, dtype=torch.float64, device=gaps.device)
    before = (j[:, None] + torch.cumsum(top, -1) - top) / arange
    above = _prefix((top > before) & (top > j[:, None]))  # [n, m]
    member = torch.cat([above, torch.ones_like(above[:, :1])], -1)  # [n, m+1]: j is the last column
    count = member.sum(-1).double()
    mean_gap = torch.where(member, gaps, 0.0).sum(-1) / count  # [n] log GM - log q_1
    delta = torch.where(member, gaps - mean_gap[:, None], 0.0)
    # 1 - Z = sum_G (q_i - GM) = GM * sum_G (expm1(delta_i) - delta_i), each term >= 0 (sum delta = 0); near a tie
    # at the cut delta is small and expm1(delta) - delta = delta^2 / 2 + ... is summed as a series.
    log_gm = mean_gap - stats.log_s
    shortfall = torch.exp(log_gm) * _expm1_minus(delta).sum(-1)
    d = -torch.log1p(-shortfall)
    far = shortfall > 0.5
    if far.any():
        # Z is small: compute it from the mass outside the group, not as 1 - (something near 1).
        rows = logits[far].scatter(-1, stats.top_index[far, : m + 1], float("-inf"))
        outside = torch.exp(torch.logsumexp(rows.double(), -1) - stats.lse[far])
        inside_free = torch.where(member[far], 0.0, torch.exp(stats.top_logp[far, : m + 1])).sum(-1)
        d[far] = -torch.log(outside + inside_free + count[far] * torch.exp(log_gm[far]))
    d = torch.where(torch.isneginf(j), math.inf, d)
    rtol = stats.s_rtol + (8 * (m + 4) ** 2 + 64) * _U
    return round_down(d, logits.dtype, rtol)


# expm1(x) - x = x^2 sum_{k >= 2} x^(k-2) / k!: for |x| <= 1/8 the terms after k = 12 sum to less than 1e-19.
_EXPM1_SERIES = tuple(1 / math.factorial(k) for k in range(2, 13))


def _expm1_minus(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) - x, float64, without the cancellation of the closed form for small |x|."""
    small = x.abs() <= 1 / 8
    y = torch.where(small, x, 0.0)
    poly = torch.full_like(x, _EXPM1_SERIES[-1])
    for c in reversed(_EXPM1_SERIES[:-1]):
        poly = poly * y + c
    return torch.where(small, y * y * poly, torch.expm1(x) - x)


def top1_certificates(logits: torch.Tensor, candidates: int | None = None) -> torch.Tensor:
    r"""D_q(1) of float32/64 torch logits ``[n, V]``, unchecked: :func:`drafter_certificate` at m = 1 without its
    input validation, for a decoder asking it of the logits of its own drafter at every drafted position.

    With q_1 >= q_2 the drafter's two most probable tokens, G = {1, 2} and GM = sqrt(q_1 q_2), so (THEORY.md
    section 7, m = 1)

    .. math::

        D_q(1) = -\log\big(1 - (\sqrt{q_1} - \sqrt{q_2})^2\big)
               = \log S - \log\big(2 e^{-d/2} + R\big),

    with d = l_1 - l_2 the gap of the two top logits, S = sum_x e^{l_x - l_1} = 1 + e^{-d} + R and R the same sum
    over the other tokens. The first form is computed as ``-log1p(-expm1(-d/2)^2 / S)`` (exact near a tie, where d
    is small: d is the difference of two logits, exact in float64), the second where the gap (sqrt(q_1) -
    sqrt(q_2))^2 exceeds 1/2 (q concentrated: there 1 - gap would cancel). Rounded down; ``inf`` where q has one
    token of mass.

    ``candidates``: only the first that many logits may be q's two most probable tokens, the others count in R
    only (a caller that knows the others are below them: :meth:`~specert.drafters.head.DraftHead.certificate`).

    NOTE: eager, the two top logits and R are found in numpy (R summed in float64): a handful of vectorised passes,
    where each torch op costs more in dispatch than in arithmetic on one row (with the caches cold, as after a
    model's forward: 0.11 ms against 0.22 ms for 8,193 logits, 0.19 against 0.26 for 49,152). Inside a
    graph being compiled (a compiled drafter step computes it with its logits:
    :mod:`specert.decoding.static_cache`) they
    are torch ops, which inductor fuses.
    """
    if torch.compiler.is_compiling() or logits.dtype not in CERTIFICATE_RTOL or logits.device.type != "cpu":
        # torch ops, on any device (the numpy path below is for CPU tensors only)
        first = argmax(logits[:, :candidates])[:, None]
        top1 = logits.gather(-1, first)
        rest = logits.scatter(-1, first, -math.inf)
        second = argmax(rest[:, :candidates])[:, None]
        d = (top1 - rest.gather(-1, second)).squeeze(-1).double()  # inf when q has one token of mass: D = inf
        outside = torch.exp(rest.scatter(-1, second, -math.inf) - top1).sum(-1).double()  # R
        return round_down(_top1_closed_form(d, outside, torch), logits.dtype)
    x = logits.detach().numpy()
    rows = np.arange(len(x))
    first = x[:, :candidates].argmax(-1)
    top1 = x[rows, first]
    rest = x.copy()
    rest[rows, first] = -np.inf
    second = rest[:, :candidates].argmax(-1)
    d = top1.astype(np.float64) - rest[rows, second]  # inf when q has one token of mass: D = inf
    rest[rows, second] = -np.inf
    outside = np.exp(rest - top1[:, None]).sum(-1, dtype=np.float64)  # R
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf: one token of mass
        value = _top1_closed_form(d, outside, np)
    return round_down(torch.from_numpy(value), logits.dtype)


def _top1_closed_form(d, outside, xp):
    """D_q(1) from the gap d of the two top logits and R (:func:`top1_certificates`), float64, in the array library
    ``xp`` (torch or numpy)."""
    total = 1 + xp.exp(-d) + outside  # S
    gap = xp.expm1(-d / 2) ** 2 / total
    far = xp.log(total) - xp.log(2 * xp.exp(-d / 2) + outside)  # log(0) = -inf: one token of mass
    return xp.where(gap > 0.5, far, -xp.log1p(-gap))
