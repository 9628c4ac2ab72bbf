"""Exact acceptance certificates (THEORY.md sections 2-4 and 7).

The certificate of a rule at target distribution p is

    C_p = inf { KL(p || q) : q in R_p },

the smallest KL(p || q) at which a drafter q can be rejected (``inf`` when no drafter can). Below it every draft is
accepted. All three closed forms are water-fillings: a group of tokens is flattened to one level c, which costs

    cost(G) = sum_{i in G} p_i log(p_i / c),   c = mean of p over G            (arithmetic, sections 3-4)

on the target side and ``-log(1 - sum_G q_i + |G| GM)``, GM the geometric mean of q over G, on the drafter side
(section 7). Each needs a handful of top tokens: one ``topk`` and one pass for the normaliser, never a full sort.

Numerics: costs are sums of non-negative terms ``c * h(p_i / c - 1)`` with ``h(d) = (1 + d) log1p(d) - d``, so a
certificate near 0 (near-ties) keeps its relative precision. Results are float64 and rounded *down* by a relative
``CERTIFICATE_RTOL`` of the compute dtype: a certificate may understate, never overstate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from specert.rules import Rule, Tree
from specert.rules import rule as as_rule
from specert.stats import TargetStats
from specert.tensors import argmax, as_logits, map_blocks

# Relative downward rounding by compute dtype: float32 inputs carry about 1e-7 relative error in their normaliser.
CERTIFICATE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shrink a non-negative certificate by the compute dtype's relative tolerance (``inf`` stays ``inf``)."""
    return value * (1.0 - CERTIFICATE_RTOL[dtype])


def _flatten_cost(logp: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cost of flattening the members of each row to their mean probability.

    Args:
        logp: ``[n, G]`` float64 log-probabilities of candidate tokens (``-inf`` for p = 0).
        member: ``[n, G]`` bool, the group of each row (non-empty).
    Returns:
        ``(cost [n], log_c [n])`` with cost = sum_{member} p_i log(p_i / c) and c the members' mean p.
    """
    count = member.sum(-1).double()
    log_c = torch.logsumexp(torch.where(member, logp, float("-inf")), -1) - torch.log(count)  # [n]
    d = torch.expm1(logp - log_c[:, None])  # p_i / c - 1, in [-1, inf)
    h = torch.where(d > -1, (1 + d) * torch.log1p(d) - d, torch.ones_like(d))  # h(-1) = 1: p_i = 0
    cost = torch.exp(log_c) * torch.where(member, h, 0.0).sum(-1)
    return cost, log_c


def _prefix(include: torch.Tensor) -> torch.Tensor:
    """Keep the leading run of True in each row of a bool ``[n, k]`` tensor."""
    return include.int().cumprod(-1).bool()


def _fill_above(stats: TargetStats, j_logit: torch.Tensor):
    """W(p, j) = min { KL(p || q) : q_j >= q_i for all i } (THEORY.md section 3).

    The group is {j} plus A, the tokens above the running mean c, grown in order of p. Returns
    ``(cost [n], member [n, k] over the top tokens, log_c [n])``; j itself is always in the group.
    """
    j_logp = j_logit.double() - stats.lse  # [n]
    while True:
        top_logp = stats.top_logp  # [n, k]
        top_p, j_p = torch.exp(top_logp), torch.exp(j_logp)
        # Mean of the group before adding top token i: (p_j + sum_{l<i} p_l) / (i + 1).
        before = (j_p[:, None] + torch.cumsum(top_p, -1) - top_p) / torch.arange(1, stats.k + 1, dtype=torch.float64)
        member = _prefix((top_p > before) & (top_logp > j_logp[:, None]))  # [n, k]
        if stats.k == stats.vocab_size or not member[:, -1].any():
            break
        stats.ensure_top(4 * stats.k)  # the group runs past the gathered tokens: gather more
    with_j = torch.cat([member, torch.ones_like(member[:, :1])], -1)  # [n, k+1]: j is the last column
    cost, log_c = _flatten_cost(torch.cat([top_logp, j_logp[:, None]], -1), with_j)
    return cost, member, log_c


def _fill_below(stats: TargetStats, m: int):
    """C_p^tree(m) (THEORY.md section 4): x0 plus the competitors (ranks 2..m+1) below the running mean.

    Returns ``(cost [n], member [n, m+1] over ranks 1..m+1, log_c [n])``.
    """
    stats.ensure_top(m + 1)
    top_logp = stats.top_logp[:, : m + 1]  # [n, m+1]
    top_p = torch.exp(top_logp)
    rising = top_p[:, 1:].flip(-1)  # competitors from the smallest: ranks m+1, m, ..., 2
    before = (top_p[:, :1] + torch.cumsum(rising, -1) - rising) / torch.arange(1, m + 1, dtype=torch.float64)
    joined = _prefix(rising < before).flip(-1)  # [n, m], back in rank order 2..m+1
    member = torch.cat([torch.ones_like(joined[:, :1]), joined], -1)
    cost, log_c = _flatten_cost(top_logp, member)
    return cost, member, log_c


def _certificate_of_stats(stats: TargetStats, r: Rule) -> torch.Tensor:
    if isinstance(r, Tree):
        cost = _fill_below(stats, r.m)[0]
    else:
        j_logit, _, found = stats.most_probable_rejected(r.reject_level(stats))
        cost = torch.where(found, _fill_above(stats, j_logit)[0], math.inf)
    return round_down(cost, stats.logits.dtype)


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
        rule: a spec string or a :class:`~specert.rules.Rule`.
    Returns:
        float64 ``[...]`` in the input's library, rounded down (it may understate, never overstate).

    >>> import torch
    >>> p1, p2 = 0.7, 0.3
    >>> c = certificate(torch.tensor([p1, p2]).log(), "greedy").item()
    >>> abs(c - (p1 * math.log(2 * p1) + p2 * math.log(2 * p2))) < 1e-6
    True
    """
    r = as_rule(rule)
    target = as_logits(target_logits, "target_logits")
    r.validate(target.vocab_size)
    stats = TargetStats.of(target.values, entropy=r.needs_entropy)
    return target.output(_certificate_of_stats(stats, r))


def certificates(target_logits, rules) -> dict:
    """Certificates of several rules at once, sharing the passes over the vocabulary.

    Returns a dict from each rule's spec string to its float64 ``[...]`` certificate (see :func:`certificate`).
    """
    parsed = [as_rule(r) for r in rules]
    target = as_logits(target_logits, "target_logits")
    for r in parsed:
        r.validate(target.vocab_size)

    stats = TargetStats.of(target.values, entropy=any(r.needs_entropy for r in parsed))
    return {r.spec: target.output(_certificate_of_stats(stats, r)) for r in parsed}


def extremal_drafter(target_logits, rule):
    """Log-probabilities of a drafter q* on the rejection boundary with KL(p || q*) = C_p.

    q* = p except on the water-filled group, which is flattened to its mean c; the group's tokens then tie for
    the drafter's top (single-candidate rules: j* ties the drafter's argmax, so the draft is rejected under the
    worst-case tie convention) or x0 ties m competitors (tree rules). Rows where the rule rejects nothing
    (certificate ``inf``) are NaN.

    Returns:
        float64 ``[..., V]`` log-probabilities in the input's library.
    """
    r = as_rule(rule)
    target = as_logits(target_logits, "target_logits")
    r.validate(target.vocab_size)

    def block(logits):
        stats = TargetStats.of(logits, entropy=r.needs_entropy)
        logp = torch.log_softmax(logits.double(), -1)  # [n, V]
        if isinstance(r, Tree):
            _, member, log_c = _fill_below(stats, r.m)
            index = stats.top_index[:, : r.m + 1]
            # Competitors left out of the group sit at or above c: keep them there exactly.
            floor = torch.where(member, log_c[:, None], torch.maximum(logp.gather(-1, index), log_c[:, None]))
            q = logp.scatter(-1, index, floor)
            found = torch.ones(len(logits), dtype=torch.bool)
        else:
            j_logit, j_index, found = stats.most_probable_rejected(r.reject_level(stats), with_index=True)
            _, member, log_c = _fill_above(stats, j_logit)
            q = torch.minimum(logp, log_c[:, None])  # nobody may stand above the group
            q = q.scatter(-1, stats.top_index, torch.where(member, log_c[:, None], q.gather(-1, stats.top_index)))
            q = q.scatter(-1, j_index[:, None], log_c[:, None])
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
    stats = TargetStats.of(logits, k=m + 1)  # the drafter's top m + 1: all that D_q(m) needs
    logq = stats.top_logp[:, : m + 1]  # [n, m+1]
    j = logq[:, m]
    top = logq[:, :m]
    # Running mean of log q over the group before adding top token i: (log q_j + sum_{l<i} log q_l) / (i + 1).
    before = (j[:, None] + torch.cumsum(top, -1) - top) / torch.arange(1, m + 1, dtype=torch.float64)
    above = _prefix((top > before) & (top > j[:, None]))  # [n, m]
    member = torch.cat([above, torch.ones_like(above[:, :1])], -1)  # [n, m+1]: j is the last column
    count = member.sum(-1).double()
    log_gm = torch.where(member, logq, 0.0).sum(-1) / count  # [n]
    delta = torch.where(member, logq - log_gm[:, None], 0.0)
    # 1 - Z = sum_G (q_i - GM) = GM * sum_G (expm1(delta_i) - delta_i), each term >= 0 (sum delta = 0).
    shortfall = torch.exp(log_gm) * (torch.expm1(delta) - delta).sum(-1)
    d = -torch.log1p(-shortfall)
    far = shortfall > 0.5
    if far.any():
        # Z is small: compute it from the mass outside the group, not as 1 - (something near 1).
        rows = logits[far].scatter(-1, stats.top_index[far, : m + 1], float("-inf"))
        outside = torch.exp(torch.logsumexp(rows.double(), -1) - stats.lse[far])
        inside_free = torch.where(member[far], 0.0, torch.exp(logq[far])).sum(-1)
        d[far] = -torch.log(outside + inside_free + count[far] * torch.exp(log_gm[far]))
    d = torch.where(torch.isneginf(j), math.inf, d)
    return round_down(d, logits.dtype)


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
    only (a caller that knows the others are below them: :meth:`~specert.head.DraftHead.certificate`).

    NOTE: eager, the two top logits and R are found in numpy (R summed in float64): a handful of vectorised passes,
    where each torch op costs more in dispatch than in arithmetic on one row (with the caches cold, as after a
    model's forward: 0.11 ms against 0.22 ms for 8,193 logits, 0.19 against 0.26 for 49,152; session 18). Inside a
    graph being compiled (a compiled drafter step computes it with its logits: :mod:`specert.static_cache`) they
    are torch ops, which inductor fuses.
    """
    if torch.compiler.is_compiling() or logits.dtype not in CERTIFICATE_RTOL or logits.device.type != "cpu":
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
