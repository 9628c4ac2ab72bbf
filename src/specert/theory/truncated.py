r"""Certificates and KL from a truncated target distribution: the K most probable tokens (THEORY.md section 9).

An inference server returns, per step, the K most probable target tokens with their exact log-probabilities
(log-softmax over the whole vocabulary; vLLM's ``logprobs``), not the V logits. Then C_p and KL(p || q) are known only
up to an interval, and a step is certified when the interval of KL lies below that of C_p.

Glossary (per row, float64):

- **known**: p_(1) >= ... >= p_(K), the K returned probabilities, and their token ids;
- **tail**: the other n = V - K tokens, each at most p_(K) (they are not in the top K), summing to
  T = 1 - sum_{i<=K} p_(i); a *consistent tail* is any such vector, and a *consistent distribution* the known
  tokens plus a consistent tail;
- **interval** [lower, upper]: the infimum and supremum of the quantity over consistent distributions (or sound
  bounds on them, where said), widened by ``RTOL`` so that rounding never makes them overstate; **exact**: the
  known tokens determine the value.

Tail tokens may be arbitrarily small but not 0, unless the target masks tokens (``TopK.masked``): the certificate
rules always reject a token of probability 0, so masking changes what a tail may hold.

The ends of the certificate interval, for a single-candidate rule of reject level L (a token is rejected iff
log p <= L; THEORY.md section 3) and j* its most probable rejected token, C_p = W(p, j*):

============================================  ===========================================================  ======
case                                          interval                                                     sharp
============================================  ===========================================================  ======
p_(K) rejected                                W(p, j*) exactly, j* in the top K: W reads j* and the tokens  exact
                                              above its water level, all known (tail tokens <= p_(K) <=
                                              p_(j*) <= level)
no consistent tail holds a rejected token     inf exactly                                                  exact
otherwise, j* in the tail (tau = e^L)         lower: W(known + w^(n-1); p_j = u), u = min(tau, T),         yes
                                              w = (T - u)/(n - 1), the rest of the tail spread evenly
                                              upper: inf if some consistent tail is all accepted           yes
                                              (n tau < T), else the largest W over the vertices below
rank rules with m + 1 <= K                    the closed forms of :mod:`specert.theory.certificates`       exact
``topm:m``, m + 1 > K                         p_(m+1) = t_r, r = m + 1 - K, in [lo_r, hi_r]: lower at      yes
                                              j = hi_r, upper at j = lo_r with r - 1 tokens at p_(K) above
``tree:m``, m + 1 > K                         competitors from the tail: lower all at min(p_(K), T/r),     yes
                                              upper the largest over m + 2 vertices
``typical``                                   H unknown: tau in [tau(H_max), tau(H_min)]; lower end at the  sound
                                              largest tau, upper end at the smallest
all-of / any-of                               reject levels combine by max / min, and the children's       sound
                                              intervals by min / max; the narrower of the two
============================================  ===========================================================  ======

Why (proofs in :func:`truncated_certificate`): W(p, j) = min_{c > 0} [D(p_j, c) + sum_{i != j, p_i > c} D(p_i, c)]
with D(a, c) = a log(a/c) - a + c, so W is convex in p, symmetric and non-decreasing in the tokens other than j, and
non-increasing in p_j. A convex function's maximum over a polytope sits at a vertex, its minimum over a permutation-
symmetric set at the most even point.

One module: the certificate, KL, entropy and acceptance intervals all read the top K through ``_Known`` and share its
private helpers (``_level_range`` for certificates and acceptance, ``_entropy_range`` for ``typical`` and the entropy,
``_widen``, ``_check_topk``); split, each part would import the others' privates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from specert.theory.certificates import fill_above, fill_below, water_fill
from specert.theory.rules import AllOf, AnyOf, Rule, SingleCandidateRule, TopM, Tree, Typical
from specert.theory.rules import rule as as_rule
from specert.theory.stats import TargetStats
from specert.theory.tensors import as_logits, row_blocks

# Relative widening of every end (lower down, upper up): the ends are float64 sums of a few dozen terms.
RTOL = 1e-10
# Absolute widening of KL's ends, which may sit at 0 (p = q).
KL_ATOL = 1e-14
# How far above 1 the known probabilities may sum (log-probabilities rounded to float32 by a server: about 1e-6).
TOTAL_TOLERANCE = 1e-5
# Vertices enumerated per row for a threshold rule's upper end before falling back to a sound bound (see
# `_upper_candidates`); only rows where tail tokens can join the water-filled group need them.
MAX_CANDIDATES = 4096
# Rounding slack of the integer parts (how many tail tokens fit) so that they err towards the sound side.
_SLACK = 1e-9


# --------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TopK:
    """The K most probable target tokens of each step, as an inference server returns them (THEORY.md section 9).

    ``TopK(logprobs, ids, vocab_size)`` validates and converts arrays (torch or numpy); ``TopK.of(logits, k)``
    takes them from full logits.

    Attributes:
        logprobs: ``[..., K]`` float64 log-probabilities, log-softmax over the whole vocabulary, sorted descending.
        ids: ``[..., K]`` int64 token ids, distinct within a row, in [0, V).
        vocab_size: V, the size of the full vocabulary (K <= V).
        masked: whether the target may give tokens probability exactly 0 (masked logits): a tail token may then be
            0, which every rule rejects. ``False`` (the default) for the log-softmax of finite logits.
        total_tolerance: how far above 1 the known probabilities may sum before the data are refused (rounding of
            the source's normaliser; default ``TOTAL_TOLERANCE``).
        tail_mass: ``[N]`` float64, T = 1 - sum of the known probabilities, per flattened row (read-only).
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    vocab_size: int
    masked: bool = False
    total_tolerance: float = TOTAL_TOLERANCE
    tail_mass: torch.Tensor = field(init=False, repr=False)
    batch_shape: tuple[int, ...] = field(init=False, repr=False)
    numpy: bool = field(init=False, repr=False)

    def __post_init__(self):
        is_numpy = isinstance(self.logprobs, np.ndarray)
        logprobs = _as_float64(self.logprobs, "logprobs")
        if logprobs.ndim == 0 or logprobs.shape[-1] < 1:
            raise ValueError(f"logprobs must have shape [..., K] with K >= 1, got {list(logprobs.shape)}")
        k = logprobs.shape[-1]
        v = self.vocab_size
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ValueError(f"vocab_size must be a whole number >= 2, got {v!r}")
        if k > v:
            raise ValueError(f"logprobs has K = {k} tokens per row, more than vocab_size V = {v}")
        ids = torch.as_tensor(self.ids.copy() if isinstance(self.ids, np.ndarray) else self.ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must hold whole token ids, got dtype {ids.dtype}")
        if tuple(ids.shape) != tuple(logprobs.shape):
            raise ValueError(f"ids has shape {list(ids.shape)}, logprobs {list(logprobs.shape)}: they must match")
        batch_shape = tuple(logprobs.shape[:-1])
        logprobs = logprobs.reshape(-1, k)
        ids = ids.to(torch.int64).reshape(-1, k)
        if len(ids) and (ids.min() < 0 or ids.max() >= v):
            raise ValueError(f"ids must lie in [0, vocab_size) = [0, {v}), got {int(ids.min())}..{int(ids.max())}")
        if k > 1 and (ids.sort(-1).values.diff(dim=-1) == 0).any():
            raise ValueError("ids repeat a token within a row: the K tokens of a row must be distinct")
        if torch.isnan(logprobs).any() or torch.isposinf(logprobs).any():
            raise ValueError("logprobs contains NaN or +inf; log-probabilities must be finite (or -inf if masked)")
        if torch.isneginf(logprobs).any():
            if not self.masked:
                raise ValueError("logprobs contains -inf (probability 0): pass masked=True if the target masks tokens")
            if torch.isneginf(logprobs[:, 0]).any():
                raise ValueError("logprobs has a row whose most probable token has probability 0")
        if k > 1 and (logprobs[:, 1:] > logprobs[:, :-1]).any():
            row = int((logprobs[:, 1:] > logprobs[:, :-1]).any(-1).nonzero()[0, 0])
            raise ValueError(f"logprobs must be sorted in descending order in every row; row {row} is not")
        log_total = torch.logsumexp(logprobs, -1)  # [N]
        if (log_total > math.log1p(self.total_tolerance)).any():
            worst = float(log_total.max().exp())
            raise ValueError(
                f"logprobs sum to a probability of {worst:.9g} > 1 in some row: they must be log-softmax over the "
                f"whole vocabulary (tolerance {self.total_tolerance:g})"
            )
        tail = (-torch.expm1(log_total)).clamp(min=0.0)  # [N] T
        room = (v - k) * torch.exp(logprobs[:, -1])  # [N] the most the tail can hold: n p_(K)
        slack = self.total_tolerance
        if (tail > room * (1 + slack) + slack).any():
            row = int((tail > room * (1 + slack) + slack).nonzero()[0, 0])
            raise ValueError(
                f"row {row}: the tail mass T = {float(tail[row]):.6g} cannot fit on the V - K = {v - k} other tokens "
                f"at most p_(K) = {float(logprobs[row, -1].exp()):.6g} each: logprobs are not the K most probable "
                f"tokens of a {v}-token distribution"
            )
        object.__setattr__(self, "logprobs", logprobs)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "masked", bool(self.masked))
        object.__setattr__(self, "tail_mass", torch.minimum(tail, room))
        object.__setattr__(self, "batch_shape", batch_shape)
        object.__setattr__(self, "numpy", is_numpy)

    @classmethod
    def of(cls, logits, k: int, masked: bool | None = None) -> TopK:
        """The top ``k`` tokens of full logits ``[..., V]`` (torch or numpy): what a server would return.

        ``masked`` defaults to whether any logit is -inf.
        """
        target = as_logits(logits, "logits")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= target.vocab_size:
            raise ValueError(f"k must be a whole number with 1 <= k <= V = {target.vocab_size}, got {k!r}")
        logp = torch.log_softmax(target.values.double(), -1)  # [N, V]
        values, ids = torch.topk(logp, k, -1)  # [N, k], sorted descending
        if masked is None:
            masked = bool(torch.isneginf(target.values).any())
        shape = target.batch_shape + (k,)
        if target.numpy:
            return cls(values.reshape(shape).numpy(), ids.reshape(shape).numpy(), target.vocab_size, masked)
        return cls(values.reshape(shape), ids.reshape(shape), target.vocab_size, masked)

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    def output(self, value: torch.Tensor):
        """A per-row result ``[N]`` shaped ``[...]`` in the caller's library."""
        value = value.reshape(self.batch_shape)
        return value.numpy() if self.numpy else value


class Interval(NamedTuple):
    """An interval per step: ``lower <= value <= upper`` (float64 ``[...]``); ``exact``: bool ``[...]``, the known
    tokens determine the value (then lower and upper differ only by the rounding ``RTOL``)."""

    lower: torch.Tensor
    upper: torch.Tensor
    exact: torch.Tensor


class Decision(NamedTuple):
    """Three disjoint bool masks ``[...]`` covering every step (see :func:`decide`)."""

    certified: torch.Tensor
    not_certified: torch.Tensor
    undetermined: torch.Tensor


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must hold floating-point numbers, got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floating-point numbers, got dtype {x.dtype}")
    return x.detach().to(dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# Water-filling over the known tokens and blocks of tied tail tokens


def _top_stats(logp: torch.Tensor) -> TargetStats:
    """The known tokens ``[R, K]`` as :class:`TargetStats` of a K-token 'vocabulary' whose log-sum-exp is 0 (log S =
    -log p_(1), exact), so that the closed forms of :mod:`specert.theory.certificates` and the rules' reject levels
    read them as they are."""
    index = torch.zeros(logp.shape, dtype=torch.int64, device=logp.device)  # unused by the closed forms
    return TargetStats(logp, logp, index, -logp[:, 0])


def _fill_blocks(log_anchor, logv, weight, below: bool, upper: bool = False) -> torch.Tensor:
    """:func:`~specert.theory.certificates.water_fill` of tokens given by their log-probabilities: the anchor
    ``[R]``, blocks of tied tokens ``[R, G]`` (sorted descending for ``below=False``, ascending otherwise) with their
    multiplicities ``[R, G]`` (0: no block). The most probable known token is the reference: every value is at most
    it. Returns ``cost [R]``; ``upper`` decides membership within rounding towards the larger cost."""
    top = torch.maximum(log_anchor, logv.amax(-1))  # [R] p_(1): the anchor x0, or the first known block
    return water_fill(log_anchor - top, logv - top[:, None], weight, -top, below, upper)[0]


def _w_known(logp: torch.Tensor, log_x: torch.Tensor, upper: bool = False):
    """W(p, j) over the known tokens ``[R, K]`` and j at ``log_x [R]`` (no tail token): ``(cost, all_joined, log_c)``,
    ``all_joined`` whether every known token is in the group."""
    cost, member, log_c = fill_above(_top_stats(logp), log_x, upper)
    return cost, member[:, -1], log_c


def _w(logp, log_x, block_logv, block_w, upper: bool = False) -> torch.Tensor:
    """W(p, j) with p = the known tokens ``[R, K]`` plus tail blocks (``[R, B]`` log-probabilities sorted descending,
    each <= p_(K), with multiplicities ``[R, B]``) and j at ``log_x [R]``.

    A tail block can join the group only after every known token, and only if it stands above their water level;
    elsewhere it is W over the known tokens alone (where a block is within rounding of the level, the full
    water-filling decides)."""
    cost, all_joined, log_c = _w_known(logp, log_x, upper)
    near = log_c - 1e-12 * (1 + log_c.abs())
    enter = all_joined & ((block_w > 0) & (block_logv > near[:, None])).any(-1)
    if enter.any():
        ones = torch.ones_like(logp[enter])
        full = _fill_blocks(
            log_x[enter],
            torch.cat([logp[enter], block_logv[enter]], -1),
            torch.cat([ones, block_w[enter]], -1),
            below=False,
            upper=upper,
        )
        cost = cost.clone()
        cost[enter] = full
    return cost


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp(min=0.0))  # log 0 = -inf


def _column(*columns: torch.Tensor) -> torch.Tensor:
    return torch.stack(columns, -1)


# --------------------------------------------------------------------------------------------------------------------
# The known part of a TopK, per row


@dataclass
class _Known:
    logp: torch.Tensor  # [R, K] float64, sorted descending
    ids: torch.Tensor  # [R, K] int64
    tail: torch.Tensor  # [R] T
    n: int  # V - K tail tokens
    masked: bool

    @classmethod
    def of(cls, topk: TopK) -> _Known:
        return cls(topk.logprobs, topk.ids, topk.tail_mass, topk.vocab_size - topk.k, topk.masked)

    @functools.cached_property
    def stats(self) -> TargetStats:
        return TargetStats(self.logp, self.logp, self.ids, -self.logp[:, 0])

    @property
    def k(self) -> int:
        return self.logp.shape[-1]

    @functools.cached_property
    def a_k(self) -> torch.Tensor:
        return torch.exp(self.logp[:, -1])  # [R] p_(K)


# --------------------------------------------------------------------------------------------------------------------
# Threshold rules: a known reject level L per row


def _reject_first(kn: _Known, level: torch.Tensor):
    """Whether p_(K) is rejected (log p <= L) and the first rejected known token, per row."""
    rejected = kn.logp <= level[:, None]  # [R, K]; -inf (p = 0) always
    first = rejected.int().argmax(-1)  # [R]
    return rejected[:, -1], first


def _lower_end(kn: _Known, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inf of C_p = W(p, j*) over consistent tails for the reject level ``level [R]``: ``(value, in_top, first)``."""
    in_top, first = _reject_first(kn, level)
    value = _w_known(kn.logp, kn.logp.gather(-1, first[:, None])[:, 0])[0]
    tail = ~in_top
    if not tail.any() or kn.n == 0:
        return torch.where(tail, math.inf, value), in_top, first
    t, a_k, tau = kn.tail, kn.a_k, torch.exp(level)
    n = kn.n
    lo_x = (t - (n - 1) * a_k).clamp(min=0.0)  # every tail token holds at least this
    # A rejected tail token exists in some consistent tail: a value in (0, tau] at or above lo_x, or a masked 0.
    possible = ((tau > 0) & (lo_x <= tau)) | ((lo_x == 0) & kn.masked)
    u = torch.where(tau > 0, torch.minimum(tau, t), 0.0)  # the largest a rejected tail token can be
    spread = (t - u) / max(n - 1, 1)  # the rest of the tail, spread evenly over its n - 1 other tokens
    rows = tail & possible
    cost = torch.full_like(value, math.inf)
    if rows.any():
        cost[rows] = _w(
            kn.logp[rows],
            _log(u[rows]),
            _log(spread[rows])[:, None],
            torch.full_like(u[rows][:, None], float(n - 1)),
        )
    return torch.where(tail, cost, value), in_top, first


def _upper_end(kn: _Known, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sup of C_p = W(p, j*) over consistent tails for the reject level ``level [R]``: ``(value, in_top, first)``."""
    in_top, first = _reject_first(kn, level)
    value = _w_known(kn.logp, kn.logp.gather(-1, first[:, None])[:, 0], upper=True)[0]
    tail = ~in_top
    if not tail.any():
        return value, in_top, first
    t, tau, n = kn.tail, torch.exp(level), kn.n
    # Some consistent tail holds no rejected token (then C_p = inf): n tokens in (tau, p_(K)] summing to T, or, at
    # tau = 0 (only masked tokens are rejected), a tail with no 0.
    if n == 0:
        return torch.where(tail, math.inf, value), in_top, first
    all_accepted = torch.where(tau > 0, n * tau < t, (t > 0) | (not kn.masked))
    cost = torch.full_like(value, math.inf)
    zeros = tail & ~all_accepted & (tau == 0)  # masked, T = 0: the tail is all 0
    cost[zeros] = _w_known(kn.logp[zeros], torch.full_like(t[zeros], -math.inf), upper=True)[0]
    rows = tail & ~all_accepted & (tau > 0)
    if rows.any():
        cost[rows] = _upper_candidates(kn.logp[rows], t[rows], tau[rows], n)
    return torch.where(tail, cost, value), in_top, first


def _upper_candidates(logp: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, n: int) -> torch.Tensor:
    r"""sup of W(p, j*) over consistent tails when every one holds a rejected token (tau > 0, p_(K) > tau, n tau >= T).

    A tail splits into accepted tokens (in (tau, p_(K)]) and rejected ones (<= x = p_j*). W reads x and the accepted
    tokens only (the rejected ones sit below the water level), non-increasing in x, non-decreasing and convex in the
    accepted ones. Given the accepted tokens, x is least when the rejected ones share their mass evenly; then W is a
    convex function of the accepted tokens on a polytope, largest at a vertex: each accepted token at tau or p_(K),
    except one when x = 0. Among the vertices:

    - (b) x = 0 (a rejected token of 0 or near it): the accepted tokens take all of T; the one with the fewest tokens,
      c* = ceil(T / p_(K)), majorises the others: ``kb`` at p_(K), one ``z`` in [tau, p_(K)], the rest at tau;
    - (a) x > 0: ``k`` tokens at p_(K) and as many at tau as fit (each one more lowers x), the rejected share the
      rest; for k <= kb these are majorised by (b) with a larger x, so only k in (kb, floor(T / p_(K))] remain.

    Where p_(K) stands at or below the known tokens' water level at x = 0 no tail token ever joins the group: then
    only x matters and the answer is W at the least x. Otherwise the candidates are enumerated (up to
    ``MAX_CANDIDATES`` per row; beyond, the rule-free bound W(known + p_(K)^m + rho; x = lo_x), the most
    concentrated tail above the least possible x, which holds for every consistent tail).
    """
    a_k = torch.exp(logp[:, -1])
    lo_x = (t - (n - 1) * a_k).clamp(min=0.0)
    c_star = torch.where(t > 0, torch.ceil(t / a_k * (1 - 1e-12)), 0.0)  # fewest accepted tokens holding all of T
    b_ok = (c_star <= n - 1) & (c_star * tau <= t * (1 + 1e-12))
    # Least x: as many accepted tokens as there is mass for at tau (m), all at p_(K) where the mass allows.
    m = torch.floor(t / tau + _SLACK).clamp(max=float(n - 1))
    x_least = torch.where(b_ok, 0.0, (t - m * a_k).clamp(min=0.0) / (n - m))
    level0 = _w_known(logp, torch.full_like(t, -math.inf), upper=True)[2]  # water level of the known tokens at x = 0
    cost = _w_known(logp, _log(x_least), upper=True)[0]
    flat = logp[:, -1] > level0 - 1e-12 * (1 + level0.abs())  # p_(K) above (or at) the water level at x = 0
    if not flat.any():
        return cost
    logp, t, tau, a_k, lo_x, c_star, b_ok = (x[flat] for x in (logp, t, tau, a_k, lo_x, c_star, b_ok))
    rows = len(t)
    # (b)
    kb = torch.minimum(torch.floor((t - c_star * tau) / (a_k - tau) + _SLACK).clamp(min=0.0), c_star)
    z = (t - kb * a_k - (c_star - kb - 1) * tau).clamp(min=0.0)
    z = torch.minimum(torch.maximum(z, tau), a_k)
    best = torch.where(
        b_ok,
        _w(
            logp,
            torch.full_like(t, -math.inf),
            _column(_log(a_k), _log(z), _log(tau)),
            _column(kb, (kb < c_star).double(), (c_star - kb - 1).clamp(min=0.0)),
            upper=True,
        ),
        -math.inf,
    )
    # (a)
    k_max = torch.floor(t / a_k + _SLACK).clamp(max=float(n - 1))
    k_lo = torch.where(b_ok, kb, 0.0)
    count = (k_max - k_lo + 1).clamp(min=0.0)
    many = count > MAX_CANDIDATES
    if many.any():  # the rule-free bound
        m_full = torch.floor((t - lo_x) / a_k + _SLACK).clamp(max=float(n - 1))
        rho = (t - lo_x - m_full * a_k).clamp(min=0.0)
        bound = _w(
            logp[many], _log(lo_x[many]), _column(_log(a_k), _log(rho))[many],
            _column(m_full, (rho > 0).double())[many],
            upper=True,
        )
        best[many] = torch.maximum(best[many], bound)
        count = torch.where(many, 0.0, count)
    width = int(count.max()) if rows else 0
    if width:
        per_chunk = max(1, (1 << 18) // (width * (logp.shape[1] + 2)))
        for s in range(0, rows, per_chunk):
            sl = slice(s, min(s + per_chunk, rows))
            k = k_lo[sl, None] + torch.arange(width, dtype=torch.float64, device=t.device)  # [r, width]
            valid = k < k_lo[sl, None] + count[sl, None]
            k = torch.where(valid, k, 0.0)
            tt, tu, ak = t[sl, None], tau[sl, None], a_k[sl, None]
            ell = torch.minimum(torch.floor((tt - k * ak) / tu + _SLACK), n - 1 - k).clamp(min=0.0)
            x = (tt - k * ak - ell * tu).clamp(min=0.0) / (n - k - ell)
            r = k.numel()
            f = _w(
                logp[sl].repeat_interleave(width, 0),
                _log(x).reshape(r),
                torch.stack([_log(ak).expand_as(k), _log(tu).expand_as(k)], -1).reshape(r, 2),
                torch.stack([k, ell], -1).reshape(r, 2),
                upper=True,
            ).reshape(k.shape)
            best[sl] = torch.maximum(best[sl], torch.where(valid, f, -math.inf).amax(-1))
    cost[flat] = torch.maximum(cost[flat], best)
    return cost


# --------------------------------------------------------------------------------------------------------------------
# Reject levels of every single-candidate rule: known, or an interval


def _entropy_range(kn: _Known, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bounds on H = -sum_x p(x) log(p(x) + offset) over consistent tails, float64 ``[R]`` each.

    h(t) = -t log(t + offset) is concave with h(0) = 0, so the tail's sum is Schur-concave: largest at the even
    spread T/n (T log(n/T) at offset 0), least at the most concentrated tail, k = floor(T / p_(K)) tokens at p_(K)
    and one at rho = T - k p_(K) (>= T log(1/p_(K)) at offset 0, the bound of THEORY.md). Both are attained.
    """
    p = torch.exp(kn.logp)

    def h(x, log_x=None):
        inner = log_x if (offset == 0.0 and log_x is not None) else torch.log(x + offset)
        return torch.where(x > 0, -x * inner, 0.0)

    known = h(p, kn.logp).sum(-1)
    t, a_k = kn.tail, kn.a_k
    k = torch.where(a_k > 0, torch.floor(t / a_k), 0.0)
    rho = (t - k * a_k).clamp(min=0.0)
    least = k * h(a_k, kn.logp[:, -1]) + h(rho)
    most = h(t / max(kn.n, 1)) * kn.n if kn.n else torch.zeros_like(t)
    lo, hi = known + least, known + most
    margin = 1e-12 * (1 + lo.abs() + hi.abs())  # float64 sums here and in the full entropy
    return lo - margin, hi + margin


def _rank_range(kn: _Known, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds [lo_r, hi_r] on p_(m+1) = t_r, the r-th largest tail token (r = m + 1 - K >= 1): hi_r = min(p_(K), T/r)
    (r tokens at most p_(K) within T), lo_r = (T - (r-1) p_(K)) / (n - r + 1) (the r - 1 above it full)."""
    r = m + 1 - kn.k
    hi = torch.minimum(kn.a_k, kn.tail / r)
    if not kn.masked:  # p_(m+1) > 0 even where T rounds to 0: as a level, it rejects the tail's tiny tokens
        hi = hi.clamp(min=torch.finfo(torch.float64).tiny)
    lo = ((kn.tail - (r - 1) * kn.a_k) / (kn.n - r + 1)).clamp(min=0.0)
    return lo, hi


def _level_range(kn: _Known, r: SingleCandidateRule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` float64 ``[R]``: the rule's reject level (log-probability) lies in [lo, hi] for every consistent
    tail, and for the rounding of the level's computation (:meth:`~specert.theory.rules.SingleCandidateRule.
    reject_range`). All-of takes the max of its parts' levels, any-of the min; both are monotone, so the bounds
    combine so."""
    if isinstance(r, (AllOf, AnyOf)):
        parts = [_level_range(kn, c) for c in r.rules]
        pick = torch.maximum if isinstance(r, AllOf) else torch.minimum
        return functools.reduce(pick, [p[0] for p in parts]), functools.reduce(pick, [p[1] for p in parts])
    if isinstance(r, Typical):
        # tau = min(eps, delta exp(-H)) falls as H grows: the least entropy gives the highest level.
        h_lo, h_hi = _entropy_range(kn, r.offset)
        s = kn.stats

        def at(h):
            return TargetStats(s.logits, s.top_logits, s.top_index, s.log_s, 0.0, {r.offset: h})

        return r.reject_range(at(h_hi))[0], r.reject_range(at(h_lo))[1]
    if isinstance(r, TopM) and r.m >= kn.k:
        lo, hi = _rank_range(kn, r.m)
        return _log(lo), _log(hi)
    return r.reject_range(kn.stats)


# --------------------------------------------------------------------------------------------------------------------
# Rank rules past the known tokens


def _topm_tail(kn: _Known, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``topm:m`` with m + 1 > K: j* = t_r, the r-th largest tail token, r = m + 1 - K.

    W >= W(known; p_j = t_r) (the r - 1 tail tokens above j are >= t_r, so they and their ties stay out of the
    group or cost at least that), non-increasing in t_r <= hi_r: the lower end is W(known; hi_r), attained with r
    tail tokens at hi_r. The upper end puts j at its least, lo_r, and the r - 1 tokens above it at their largest:
    all at p_(K) when lo_r > 0, else the most concentrated split of T (k at p_(K), one at rho), which weakly
    majorises every other; W is non-decreasing and Schur-convex in them, so this is the supremum (approached).
    """
    r = m + 1 - kn.k
    lo, hi = _rank_range(kn, m)
    lower = _w_known(kn.logp, _log(hi))[0]
    above = torch.minimum((r - 1) * kn.a_k, kn.tail)  # mass of the r - 1 tokens above j
    k = torch.floor(_ratio(above, kn.a_k) + _SLACK).clamp(max=float(r - 1))
    rho = (above - k * kn.a_k).clamp(min=0.0)
    upper = _w(kn.logp, _log(lo), _column(_log(kn.a_k), _log(rho)), _column(k, (rho > 0).double()), upper=True)
    return lower, upper


def _ratio(mass: torch.Tensor, a_k: torch.Tensor) -> torch.Tensor:
    """mass / p_(K), 0 where p_(K) = 0 (masked rows: fewer than K tokens of non-zero probability, no tail mass)."""
    return torch.where(a_k > 0, mass / a_k.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def _tree_tail(kn: _Known, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``tree:m`` with m + 1 > K: the competitors are ranks 2..K and the r = m + 1 - K largest tail tokens c.

    The tree's cost is convex in c and non-increasing in each (raising a competitor makes it cheaper to tie x0).
    Lower end: every c at b = min(p_(K), T/r) (weakly supermajorises every feasible c). Upper end: the largest
    over the vertices of the polytope {c in [0, p_(K)]^r : sum c <= T, sum c + (n - r) c_i >= T} of feasible
    top-r tails: k at p_(K) and the other r - k at v = (T - k p_(K)) / (n - k) (the whole rest of the tail even),
    k = 0..r; or all of T on the competitors, k at p_(K), one at rho and the rest 0.
    """
    r, t, a_k, n = m + 1 - kn.k, kn.tail, kn.a_k, kn.n
    rows = len(t)
    a1 = kn.logp[:, 0]
    known = kn.logp[:, 1:].flip(-1)  # [R, K-1] ranks K..2, ascending

    def tree_cost(block_logv, block_w, upper):  # blocks [R', B] ascending, each <= p_(K)
        reps = len(block_logv) // rows
        logv = torch.cat([block_logv, known.repeat_interleave(reps, 0)], -1)
        weight = torch.cat([block_w, torch.ones_like(known).repeat_interleave(reps, 0)], -1)
        return _fill_blocks(a1.repeat_interleave(reps, 0), logv, weight, below=True, upper=upper)

    b = torch.minimum(a_k, t / r)
    lower = tree_cost(_log(b)[:, None], torch.full_like(b[:, None], float(r)), upper=False)
    k = torch.arange(r + 1, dtype=torch.float64, device=t.device)[None, :].expand(rows, -1)  # [R, r+1]
    v = (t[:, None] - k * a_k[:, None]) / (n - k).clamp(min=1)
    valid = (k * a_k[:, None] <= t[:, None] * (1 + 1e-12)) & (n - k > 0)
    v = torch.minimum(v.clamp(min=0.0), a_k[:, None])
    pad = torch.full_like(v, -math.inf)  # an empty block (weight 0), to align with the heaped vertex's three
    spread = torch.stack([pad, _log(v), _log(a_k)[:, None].expand_as(v)], -1)  # [R, r+1, 3] ascending
    spread_w = torch.stack([torch.zeros_like(k), r - k, k], -1)
    k0 = torch.floor(_ratio(t, a_k) + _SLACK).clamp(max=float(r))
    rho = (t - k0 * a_k).clamp(min=0.0)
    has_rho = (rho > 0) & (k0 < r)
    heaped = torch.stack([torch.full_like(t, -math.inf), _log(rho), _log(a_k)], -1)[:, None]  # [R, 1, 3]
    heaped_w = torch.stack([(r - k0 - has_rho.double()).clamp(min=0.0), has_rho.double(), k0], -1)[:, None]
    blocks = torch.cat([spread, heaped], 1)  # [R, r+2, 3]
    weights = torch.cat([spread_w, heaped_w], 1)
    valid = torch.cat([valid, (t <= r * a_k * (1 + 1e-12))[:, None]], 1)
    costs = tree_cost(blocks.reshape(-1, 3), weights.reshape(-1, 3), upper=True).reshape(rows, r + 2)
    upper = torch.where(valid, costs, -math.inf).amax(-1)
    return lower, torch.where(t > 0, upper, lower)  # no tail mass: every tail competitor is 0, the lower end exact


# --------------------------------------------------------------------------------------------------------------------
# Certificates


def _interval(kn: _Known, r: Rule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lower, upper, exact)`` float64/bool ``[R]``, not yet widened."""
    if isinstance(r, Tree):
        if r.m + 1 <= kn.k:
            lower, upper = fill_below(kn.stats, r.m)[0], fill_below(kn.stats, r.m, upper=True)[0]
            return lower, upper, torch.ones_like(lower, dtype=torch.bool)
        lower, upper = _tree_tail(kn, r.m)
        return lower, upper, torch.zeros_like(lower, dtype=torch.bool)
    if isinstance(r, TopM) and r.m + 1 > kn.k:
        lower, upper = _topm_tail(kn, r.m)
        return lower, upper, torch.zeros_like(lower, dtype=torch.bool)
    lo, hi = _level_range(kn, r)
    # C_p is non-increasing in the reject level: the highest level gives the lower end, the lowest the upper.
    lower, in_top_hi, first_hi = _lower_end(kn, hi)
    upper, in_top_lo, first_lo = _upper_end(kn, lo)
    # Exact when j* is the same known token at every level in [lo, hi], or when nothing can be rejected.
    exact = (in_top_hi & in_top_lo & (first_hi == first_lo)) | torch.isinf(lower)
    if isinstance(r, (AllOf, AnyOf)):
        # The parts' certificates: all-of C = min of them, any-of C = max (their rejected sets are lower level
        # sets of p, so the combination's j* is the more, resp. less, probable of theirs).
        parts = [_interval(kn, c) for c in r.rules]
        pick = torch.minimum if isinstance(r, AllOf) else torch.maximum
        lower = torch.maximum(lower, functools.reduce(pick, [p[0] for p in parts]))
        upper = torch.minimum(upper, functools.reduce(pick, [p[1] for p in parts]))
        exact = exact | functools.reduce(torch.logical_and, [p[2] for p in parts])
    return lower, upper, exact


def _widen(lower: torch.Tensor, upper: torch.Tensor, atol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lower = (lower * (1 - RTOL) - atol).clamp(min=0.0)
    upper = upper * (1 + RTOL) + atol
    return lower, upper


def _check_topk(topk) -> None:
    if not isinstance(topk, TopK):
        raise ValueError(
            f"topk must be a TopK (TopK(logprobs, ids, vocab_size) or TopK.of(logits, k)), got {type(topk).__name__}"
        )


def truncated_certificate(topk: TopK, rule) -> Interval:
    r"""Interval of the certificate C_p of a rule when only the top K of p are known (THEORY.md section 9).

    ``lower <= C_p <= upper`` for every distribution p consistent with the known tokens (the tail: n = V - K tokens,
    each at most p_(K), summing to T = 1 - sum of the top K). Each end is the infimum / supremum over consistent
    tails where the module table says sharp, a sound bound elsewhere.

    Derivations (single-candidate rule, reject level L, tau = e^L, j* the most probable rejected token):

    - *p_(K) rejected*: j* is the first rejected known token. The group of W(p, j*) is j* plus the tokens above its
      water level c >= p_j* >= p_(K) >= every tail token, so no tail token joins: exact.
    - *j* in the tail, lower end*: for a tail with j* at x, W(p, j*) >= W(known + the other n - 1 tail tokens spread
      evenly; j at x) (W is Schur-convex in the tokens other than j), and that falls as x grows (j up, the spread
      down); x <= u = min(tau, T). So C_p >= W(known + w^(n-1); j = u), w = (T - u)/(n - 1), and the tail (u, w, ...,
      w) is consistent and rejects u (its other tokens are <= u or >= tau): sharp (approached where the rule
      accepts at tau). It needs a rejected value above lo_x = T - (n - 1) p_(K), the least a tail token can hold:
      else no tail rejects anything and C_p = inf.
    - *j* in the tail, upper end*: inf if some consistent tail is all accepted (n tokens above tau within T: n tau <
      T); otherwise the largest W over the vertices of ``_upper_candidates`` (proof there): sharp up to ties at
      tau.
    - *typical*: tau depends on H, which the tail moves within ``_entropy_range``; C_p is non-increasing in tau, so
      the lower end uses the largest tau and the upper end the smallest: sound, not sharp (one tail cannot set
      both H and j* at their extremes).
    - *all-of / any-of*: C = min / max of the parts' certificates, and the level of the combination is max / min
      of the parts' levels; both combinations of the ends are sound, and the result is the narrower.
    - *rank rules* ``topm:m``, ``tree:m``: exact for m + 1 <= K (the closed forms read ranks 1..m+1); else see
      ``_topm_tail``, ``_tree_tail`` (both ends sharp).

    ======================================  ==========================================
    case                                    result
    ======================================  ==========================================
    the rule rejects a known token p_(K)    exact
    no consistent tail has a rejected       ``inf``, ``inf``, exact
    token (e.g. n tau <= lo_x)
    some consistent tail is all accepted    upper ``inf``
    K = V                                   exact
    ======================================  ==========================================

    Args:
        topk: the known tokens (:class:`TopK`, ``[..., K]``).
        rule: a spec string or a :class:`~specert.theory.rules.Rule`.
    Returns:
        :class:`Interval` of float64 ``[...]`` (lower rounded down, upper up by ``RTOL``) and bool ``exact``.

    >>> import torch
    >>> from specert import certificate
    >>> logits = torch.tensor([[3.0, 2.0, 0.5, 0.0, -1.0]], dtype=torch.float64)
    >>> c = truncated_certificate(TopK.of(logits, 2), "greedy")  # ranks 1 and 2 are known
    >>> bool(c.exact[0]) and abs(float(c.lower[0]) - float(certificate(logits, "greedy")[0])) < 1e-9
    True
    """
    return truncated_certificates(topk, [rule])[as_rule(rule).spec]


def truncated_certificates(topk: TopK, rules) -> dict:
    """:func:`truncated_certificate` of several rules at once: a dict from each rule's spec to its Interval."""
    _check_topk(topk)
    parsed = [as_rule(r) for r in rules]
    for r in parsed:
        r.validate(topk.vocab_size)
    kn = _Known.of(topk)
    out = {}
    for r in parsed:
        lower, upper, exact = _interval(kn, r)
        lower, upper = _widen(lower, upper)
        out[r.spec] = Interval(topk.output(lower), topk.output(upper), topk.output(exact))
    return out


# --------------------------------------------------------------------------------------------------------------------
# KL(p || q)


def _d(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a log(a/b) - a + b >= 0 (summed over cells that hold all of p and of q, these sum to KL), float64; 0 log 0 = 0,
    inf where a > 0 = b. Computed as b h(a/b - 1) to keep its relative precision near a = b."""
    u = log_a - log_b
    a, b = torch.exp(log_a), torch.exp(log_b)
    term = torch.where(a > 0, a * u - b * torch.expm1(u), b)
    return torch.where((a > 0) & (b == 0), math.inf, term)


def _capped_min(t, cap, logq, log_qr, m0, cap_r) -> tuple[torch.Tensor, torch.Tensor]:
    r"""min over x, y of sum_i D(x_i, q_i) + D(m0 + y, q_R) subject to 0 <= x_i <= cap, 0 <= y <= cap_R,
    sum x + y = T (D(a, b) = a log(a/b) - a + b): ``(value [R], lam [R])``, float64.

    Args:
        t, cap, m0, cap_r: ``[R]``; logq: ``[R, M]`` log q of the capped cells, sorted descending (-inf: none);
        log_qr: ``[R]`` log q of the free cell R (-inf: none), which holds the fixed mass m0 plus y.

    KKT: x_i = min(cap, lam q_i), y = clip(lam q_R - m0, 0, cap_R) for one lam >= 0, found exactly: the mass
    g(lam) they hold is continuous, non-decreasing and linear between the breakpoints cap/q_i, m0/q_R and
    (m0 + cap_R)/q_R, so the root lies on the first segment whose right end reaches T.
    """
    q, qr = torch.exp(logq), torch.exp(log_qr)  # [R, M], [R]
    beta = torch.where(q > 0, cap[:, None] / q, math.inf)  # ascending (q descending)
    # NOTE: q's left uncapped as suffix sums, not total minus prefix: q spans hundreds of orders of magnitude
    suffix = torch.cat([torch.flip(torch.cumsum(q.flip(-1), -1), [-1]), torch.zeros_like(t)[:, None]], -1)  # [R, M+1]
    r_lo = torch.where(qr > 0, m0 / qr, math.inf)
    r_hi = torch.where(qr > 0, (m0 + cap_r) / qr, math.inf)

    def state(lam):  # [R, P] -> the mass g(lam), and the slope and intercept of g just right of lam
        c = torch.searchsorted(beta.contiguous(), lam.contiguous(), right=True)  # capped cells
        free_q = suffix.gather(-1, c)
        active = (lam >= r_lo[:, None]) & (lam < r_hi[:, None])
        full = lam >= r_hi[:, None]
        slope = free_q + torch.where(active, qr[:, None], 0.0)
        intercept = c * cap[:, None] + torch.where(full, cap_r[:, None], 0.0) - torch.where(active, m0[:, None], 0.0)
        y = torch.where(full, cap_r[:, None], torch.where(active, lam * qr[:, None] - m0[:, None], 0.0))
        return c * cap[:, None] + torch.where(c < q.shape[-1], lam * free_q, 0.0) + y, slope, intercept

    points = torch.sort(torch.cat([beta, r_lo[:, None], r_hi[:, None]], -1), -1).values  # [R, M+2]
    points = torch.cat([torch.zeros_like(t)[:, None], points], -1)
    finite = torch.isfinite(points)
    mass, _, _ = state(torch.where(finite, points, 0.0))
    reached = finite & (mass >= t[:, None])
    # the last breakpoint before the root (its right segment holds the root)
    last = torch.where(reached.any(-1), reached.int().argmax(-1) - 1, finite.sum(-1) - 1).clamp(min=0)
    left = points.gather(-1, last[:, None])
    _, slope, intercept = state(left)
    lam = torch.where(slope > 0, (t[:, None] - intercept) / torch.where(slope > 0, slope, 1.0), left)[:, 0]
    lam = torch.maximum(lam, left[:, 0])  # may overflow to inf where q is tiny: x is then its cap
    lam = torch.where(t > 0, lam, 0.0)
    x = torch.where(q > 0, torch.minimum(cap[:, None], lam[:, None] * q), 0.0)
    y = torch.minimum(torch.where(qr > 0, (lam * qr - m0).clamp(min=0.0), 0.0), cap_r)
    value = _d(_log(x), logq).sum(-1) + _d(_log(m0 + y), log_qr)
    # Where q > 0 cannot hold T, the rest sits where q = 0: KL = inf.
    room = cap * (q > 0).sum(-1) + torch.where(qr > 0, cap_r, 0.0)
    return torch.where(room < t * (1 - 1e-9), math.inf, value), lam


def _capped_min_free(t, cap, logq, log_free) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`_capped_min` without the fixed mass, the free cell uncapped: ``(value [R], lam [R])``.

    With the cells sorted by q descending, cell i caps at lam = cap / q_i (ascending); the mass held when cells
    0..i are capped is (i + 1) cap + (cap / q_i) (q_{i+1} + ... + q_free); the first i where it reaches T
    fixes lam = (T - i cap) / (q_i + ... + q_free). One pass, no search.
    """
    q, free = torch.exp(logq), torch.exp(log_free)  # [R, M], [R]
    m = q.shape[-1]
    # q left uncapped as suffix sums, not total minus prefix: q spans hundreds of orders of magnitude
    suffix = torch.cat([torch.flip(torch.cumsum(q.flip(-1), -1), [-1]), torch.zeros_like(t)[:, None]], -1)
    suffix = suffix + free[:, None]  # [R, M+1]
    beta = torch.where(q > 0, cap[:, None] / q, math.inf)
    index = torch.arange(1, m + 1, dtype=torch.float64, device=t.device)
    held = index * cap[:, None] + torch.where(q > 0, beta * suffix[:, 1:], math.inf)  # [R, M]
    reached = held >= t[:, None]
    c = torch.where(reached.any(-1), reached.int().argmax(-1), (q > 0).sum(-1))  # cells capped
    rest = suffix.gather(-1, c[:, None])[:, 0]
    lam = torch.where(rest > 0, (t - c * cap) / torch.where(rest > 0, rest, 1.0), math.inf).clamp(min=0.0)
    lam = torch.where(t > 0, lam, 0.0)
    x = torch.where(q > 0, torch.minimum(cap[:, None], lam[:, None] * q), 0.0)
    y = torch.where(free > 0, lam * free, 0.0)
    value = _d(_log(x), logq).sum(-1) + _d(_log(y), log_free)
    room = torch.where(free > 0, math.inf, cap * (q > 0).sum(-1))
    return torch.where(room < t * (1 - 1e-9), math.inf, value), lam


def _known_draft(target: TopK, draft: TopK, draft_logprobs):
    """log q at the target's known ids where known (``[N, K]``, ``known [N, K]``), and the drafter's tokens that are
    not among them (log q ``[N, K']``, -inf elsewhere)."""
    same = target.ids[:, :, None] == draft.ids[:, None, :]  # [N, K, K']
    at_target = torch.where(same, draft.logprobs[:, None, :], -math.inf).amax(-1)  # [N, K]
    known = same.any(-1)
    if draft_logprobs is not None:
        given = _as_float64(draft_logprobs, "draft_logprobs")
        if tuple(given.shape) != target.batch_shape + (target.k,):
            raise ValueError(
                f"draft_logprobs must have the target's shape {list(target.batch_shape + (target.k,))}, "
                f"got {list(given.shape)}"
            )
        given = given.reshape(-1, target.k)
        if torch.isposinf(given).any() or (given > math.log1p(TOTAL_TOLERANCE)).any():
            raise ValueError("draft_logprobs must be log-probabilities (<= 0; NaN where unknown)")
        use = ~known & ~torch.isnan(given)
        at_target = torch.where(use, given, at_target)
        known = known | use
    others = torch.where(same.any(1), -math.inf, draft.logprobs)  # [N, K'] drafter tokens outside the target's
    return at_target, known, others


def truncated_kl(target: TopK, draft, draft_logprobs=None) -> Interval:
    r"""Interval of KL(p || q), target first, when only the top K of p are known (THEORY.md section 9).

    The drafter q is known either on all V tokens (``draft``: logits ``[..., V]``) or on its own top K'
    (``draft``: a :class:`TopK`), optionally plus ``draft_logprobs``: log q at the target's known ids ``[..., K]``,
    NaN where unknown (a served drafter scoring the target's tokens as prompt gives it for the token taken).

    Lower end, by coarse-graining (data processing: KL(p || q) >= KL of the two distributions summed over any
    partition), then minimised over the unknown p: cells are the tokens where q is known (singletons) and one cell
    R for the rest. Target tokens in a singleton have their known p; the drafter's other known tokens lie in p's
    tail, p_i in [0, p_(K)]; R holds the known p of target tokens of unknown q plus what the tail leaves. The
    minimum over the tail's split (a convex problem; ``_capped_min``) is x_i = min(p_(K), lam q_i), which with q known
    everywhere is a consistent tail: the lower end is then sharp (the infimum, attained).

    Upper end: with q known everywhere, KL = sum_known + sum_tail p_i log(p_i / q_i) and the tail term is convex in
    the tail, so its maximum over {0 <= p_i <= p_(K), sum p_i = T} is at a vertex: p_(K) on the floor(T / p_(K))
    tail tokens of least q, the remainder on the next (rearrangement): sharp (attained, or approached where tail
    tokens may not be 0). With q known on its top K' only, q may be as small as it likes on a tail token, so there
    is no finite upper end (``inf``) unless the tail is empty (T = 0 or K = V) and q is known on every target token.
    A finite one would need a floor on q's tail (e.g. the drafter's least logit and its normaliser) or q at every
    token p may hold; servers return neither.

    Returns:
        :class:`Interval` of float64 ``[...]`` in the target's library (widened by ``RTOL`` and ``KL_ATOL``);
        ``exact`` where the tail is empty and q is known on the target's tokens.
    """
    _check_topk(target)
    kn = _Known.of(target)
    p_known = kn.logp
    if isinstance(draft, TopK):
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft and target have different vocabularies ({draft.vocab_size} vs {target.vocab_size} tokens)"
            )
        if draft.batch_shape != target.batch_shape:
            raise ValueError(
                f"draft batch shape {list(draft.batch_shape)} differs from the target's {list(target.batch_shape)}"
            )
        at_target, known, others = _known_draft(target, draft, draft_logprobs)
        inside = torch.where(known, _d(p_known, at_target), 0.0).sum(-1)
        m0 = torch.where(known, 0.0, torch.exp(p_known)).sum(-1)  # target mass of unknown q: in R
        known_q = torch.cat([torch.where(known, at_target, -math.inf), others], -1)
        if (torch.logsumexp(known_q, -1) > math.log1p(max(TOTAL_TOLERANCE, draft.total_tolerance))).any():
            raise ValueError("the drafter's known probabilities sum to more than 1 (draft_logprobs disagree?)")
        # NOTE: q_R = 1 - (the known q) loses its digits below 1e-16 (it is 0 where q's top K' hold all but 1e-17):
        # take q_R + delta and subtract delta, a lower bound for every q_R' <= q_R + delta since dD(a, b)/db <= 1.
        delta = 16 * (target.k + draft.k) * 2.0**-53
        log_qr = _log(-torch.expm1(torch.logsumexp(known_q, -1)) + delta)
        singles = torch.sort(others, -1, descending=True).values
        n_single = torch.isfinite(others).sum(-1).double()
        cap_r = (kn.n - n_single).clamp(min=0.0) * kn.a_k
        lower = inside + _capped_min(kn.tail, kn.a_k, singles, log_qr, m0, cap_r)[0] - delta
        exact = ((kn.tail == 0) | (kn.n == 0)) & (m0 == 0)
        upper = torch.where(exact, lower, math.inf)
    else:
        if draft_logprobs is not None:
            raise ValueError("draft_logprobs is for a truncated draft (a TopK); full draft logits already give q")
        q = as_logits(draft, "draft_logits")
        if q.vocab_size != target.vocab_size:
            raise ValueError(f"draft_logits have {q.vocab_size} tokens, the target's vocabulary {target.vocab_size}")
        if q.batch_shape != target.batch_shape:
            raise ValueError(
                f"draft_logits batch shape {list(q.batch_shape)} differs from the target's {list(target.batch_shape)}"
            )
        lower = torch.empty_like(kn.tail)
        upper = torch.empty_like(lower)
        for s in row_blocks(len(p_known), target.vocab_size):
            lower[s], upper[s] = _kl_full(p_known[s], target.ids[s], kn.tail[s], kn.a_k[s], q.values[s])
        exact = (kn.tail == 0) | (kn.n == 0)
    lower, upper = _widen(lower, upper, KL_ATOL)
    return Interval(target.output(lower), target.output(upper), target.output(exact))


def _kl_full(logp, ids, t, a_k, draft_logits):
    """KL ends for one block of rows with q known everywhere: ``(lower [R], upper [R])``, not yet widened."""
    logq = torch.log_softmax(draft_logits.double(), -1)  # [R, V]
    inside = _d(logp, logq.gather(-1, ids)).sum(-1)
    n = logq.shape[-1] - logp.shape[-1]
    if n == 0:
        return inside, inside
    zero = torch.zeros_like(t)
    tail = logq.scatter(-1, ids, -math.inf)  # [R, V] log q of the tail (the known tokens at -inf)
    q_tail = torch.exp(torch.logsumexp(tail, -1))  # [R]
    # Lower: only the tail tokens of largest q can reach the cap p_(K); take the top M as cells, the rest as one
    # cell R (exact while none of R is capped: then R's tokens get lam q_i, in proportion), all where it fails.
    m = min(n, 64)
    top, where = torch.topk(tail, min(n, m + 1), -1)  # [R, m+1] descending
    log_rest = torch.full_like(t, -math.inf)  # the tail outside the top m
    if m < n:
        log_rest = torch.logsumexp(tail.scatter(-1, where[:, :m], -math.inf), -1)
    lower, lam = _capped_min_free(t, a_k, top[:, :m], log_rest)
    redo = (lam * torch.exp(top[:, -1]) > a_k) if m < n else torch.zeros_like(t, dtype=torch.bool)
    if redo.any():
        every = torch.sort(tail[redo], -1, descending=True).values[:, :n]  # [r, n]
        lower[redo] = _capped_min_free(t[redo], a_k[redo], every, torch.full_like(t[redo], -math.inf))[0]
    lower = inside + lower
    # Upper: p_(K) on the kk tail tokens of least q, rho on the next, 0 on the rest (where D(0, q) = q).
    kk = torch.where(a_k > 0, torch.floor(t / a_k), 0.0).clamp(max=n).long()  # [R]
    need = min(n, int(kk.max()) + 1)
    up = logq.scatter(-1, ids, math.inf)  # the known tokens last in ascending order
    if need <= n // 8:
        rising = torch.topk(up, need, -1, largest=False).values  # [R, need] ascending
    else:
        rising = torch.sort(up, -1).values[:, :need]
    capped = torch.cat([zero[:, None], torch.cumsum(_d(torch.log(a_k)[:, None], rising), -1)], -1)  # [R, need+1]
    at = kk.clamp(max=need - 1)[:, None]
    rho = (t - kk * a_k).clamp(min=0.0)
    rho_term = torch.where(kk < n, _d(_log(rho), rising.gather(-1, at)[:, 0]), 0.0)
    used = torch.cat([zero[:, None], torch.cumsum(torch.exp(rising), -1)], -1)  # [R, need+1]
    beyond = (q_tail - used.gather(-1, (kk + 1).clamp(max=need)[:, None])[:, 0]).clamp(min=0.0)  # tail left at 0
    upper = inside + capped.gather(-1, kk.clamp(max=need)[:, None])[:, 0] + rho_term + beyond
    return lower, upper


# --------------------------------------------------------------------------------------------------------------------
# Decisions


def decide(kl, certificate: Interval) -> Decision:
    """Whether each step is certified, from intervals of KL(p || q) and of C_p (THEORY.md section 9).

    - certified: KL's upper end < C_p's lower end (then KL < C_p whatever the tail: the draft is accepted);
    - not certified: KL's lower end >= C_p's upper end (then KL >= C_p);
    - undetermined otherwise.

    Args:
        kl: an :class:`Interval` of KL (:func:`truncated_kl`), or a known KL (or a bound eps, THEORY.md section
            6) as a number or an array ``[...]`` broadcastable with the certificate's.
        certificate: an :class:`Interval` of C_p (:func:`truncated_certificate`).
    Returns:
        :class:`Decision`: three disjoint bool masks ``[...]`` in the certificate's library.
    """
    if not isinstance(certificate, Interval):
        raise ValueError(f"certificate must be an Interval (truncated_certificate), got {type(certificate).__name__}")
    numpy = isinstance(certificate.lower, np.ndarray)
    c_lo, c_hi = torch.as_tensor(certificate.lower), torch.as_tensor(certificate.upper)
    if isinstance(kl, Interval):
        k_lo, k_hi = torch.as_tensor(kl.lower), torch.as_tensor(kl.upper)
    else:
        k_lo = k_hi = torch.as_tensor(kl, dtype=torch.float64)
    if torch.isnan(k_lo).any() or torch.isnan(k_hi).any():
        raise ValueError("kl contains NaN")
    certified = k_hi < c_lo
    refuted = (k_lo >= c_hi) & ~certified
    undetermined = ~certified & ~refuted
    masks = (certified, refuted, undetermined)
    return Decision(*(m.numpy() if numpy else m for m in masks))


# --------------------------------------------------------------------------------------------------------------------
# Acceptance and entropy


def entropy_interval(topk: TopK, offset: float = 0.0) -> Interval:
    """Bounds on the entropy H = -sum_x p(x) log(p(x) + offset) when only the top K of p are known, float64
    ``[...]`` (both ends attained by consistent tails; see ``_entropy_range``)."""
    _check_topk(topk)
    lo, hi = _entropy_range(_Known.of(topk), offset)
    exact = (topk.tail_mass == 0) | (topk.vocab_size == topk.k)
    return Interval(topk.output(lo.clamp(min=0.0)), topk.output(hi), topk.output(exact))


def truncated_accepts(topk: TopK, tokens, rule) -> tuple:
    """Whether a rule accepts each step's drafted token when only the top K of p are known (THEORY.md sections 3
    and 9), and whether the top K decide it.

    The rule accepts a token iff its log-probability is above the rule's reject level L (``tree:m`` verifies as
    strict greedy). A token among the top K has its log p known; one outside has log p <= log min(p_(K), T). L lies
    in the interval ``_level_range`` gives over consistent tails. Accepted for sure where log p's least value is
    above L's greatest; rejected for sure where log p's greatest value is at most L's least; undecided otherwise.

    Args:
        topk: the known tokens (:class:`TopK`, ``[..., K]``).
        tokens: ``[...]`` int token ids, one per step.
        rule: a spec string or a :class:`~specert.theory.rules.Rule`.
    Returns:
        ``(accepted, decided)``: bool ``[...]`` each in the top K's library; ``accepted`` is False where undecided.
    """
    _check_topk(topk)
    r = as_rule(rule)
    r.validate(topk.vocab_size)
    if isinstance(r, Tree):
        r = TopM(1)
    tokens = torch.as_tensor(tokens, device=topk.logprobs.device).to(torch.int64).reshape(-1)
    if tokens.shape[0] != topk.logprobs.shape[0]:
        raise ValueError(f"tokens must hold one token per step ({topk.logprobs.shape[0]}), got {tokens.shape[0]}")
    kn = _Known.of(topk)
    at = kn.ids == tokens[:, None]  # [R, K]
    known = at.any(-1)
    logp = torch.where(at, kn.logp, -math.inf).amax(-1)  # [R] log p of the token where known
    ceiling = torch.where(known, logp, _log(torch.minimum(kn.a_k, kn.tail)))  # [R] the most log p can be
    floor = torch.where(known, logp, -math.inf)  # [R] the least (a tail token may be as small as it likes)
    level_lo, level_hi = _level_range(kn, r)
    accepted = floor > level_hi
    rejected = ceiling <= level_lo
    decided = accepted | rejected
    return topk.output(accepted), topk.output(decided)
