"""What the certificates need to know about target distributions, gathered in one pass over the vocabulary.

A certificate depends on the target distribution only through its normaliser, its few most probable tokens, the
most probable token a rule rejects and (for Medusa's rule) its entropy. :func:`gather` reads logits ``[N, V]`` once,
block by block so that each block stays in the CPU cache: per block one top-k (through chunk maxima,
:func:`~specert.theory.tensors.top_k`), one ``exp`` pass for the normaliser (and the entropy when asked), and,
only for the rows where a rule rejects none of the gathered top tokens, one masked ``max`` pass for all the rules
together (:func:`masked_max`) that finds the most probable token each rejects. Never a full sort. Everything after
that works on ``[N, k]`` tensors, on the device of the logits.

Notation (per row): l_1 >= l_2 >= ... the sorted logits, a_x = l_x - l_1 <= 0 the gaps to the top,
S = sum_x exp(a_x) in [1, V] the normaliser relative to the top (log-sum-exp = l_1 + log S), p_x = exp(a_x) / S.

NOTE on error bounds (what the certificates' rounding and the rules' conservative levels rely on): S is summed in
the compute dtype (float32 for float32 logits: a float64 sum costs 2-4x more), each term exp(a_x) carrying about
(2 + |a_x|) u of relative error (u = half an ulp of 1: 2^-24 in float32, 2^-53 in float64) and the sum at most D u
more, D the depth of the reduction: torch's CPU kernel sums in a cascade of 16-element chunks over 4 levels plus 4
interleaved and 8 vector lanes (D < 80 for V < 2^20; CUDA's strided partial sums are of similar depth at these V).
Weighted by the terms, |a_x| averages E_p[l_1 - l] <= H(p) <= log V, so the relative error of S is at most
``(D + 3 + log V) u``; :func:`normaliser_rtol` takes D = 128.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specert.theory.tensors import row_blocks, top_k

# Top tokens gathered at first; more are gathered only for the rows where a water-filling runs past them.
DEFAULT_TOP = 16
# Blocks from this many values on search for rejected tokens with a compiled kernel (see :func:`masked_max`).
COMPILE_MIN_ELEMENTS = 2**16
# Depth of the floating-point reduction that sums the normaliser (see the module's NOTE).
REDUCTION_DEPTH = 128


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def normaliser_rtol(dtype: torch.dtype, vocab: int) -> float:
    """Bound on the relative error of S = sum_x exp(l_x - l_1) summed in ``dtype`` over ``vocab`` tokens."""
    return (REDUCTION_DEPTH + 3 + math.log(vocab)) * unit_roundoff(dtype)


@dataclass
class Rejected:
    """The most probable token a rule rejects, per row: its logit ``[N]`` (compute dtype; -inf where only masked
    tokens are rejected), its index ``[N]`` (int64, or None where not asked) and ``found [N]`` (bool: some token is
    rejected at all). ``level [N]`` is the reject level it was found for: a token is rejected iff its logit <= it."""

    level: torch.Tensor
    logit: torch.Tensor
    index: torch.Tensor | None
    found: torch.Tensor


@dataclass
class TargetStats:
    """Top tokens, normaliser and (when asked) entropy of target logits ``[N, V]``.

    ``log_s`` with ``s_rtol`` describes the normaliser relative to the top logit; for truncated data (the K
    known log-probabilities, :mod:`specert.theory.truncated`) ``logits`` are the log-probabilities themselves,
    ``log_s = -log p_(1)`` (so that the log-sum-exp is 0) and ``s_rtol = 0``.
    """

    logits: torch.Tensor  # [N, V] compute dtype
    top_logits: torch.Tensor  # [N, k] compute dtype, sorted descending
    top_index: torch.Tensor  # [N, k] int64
    log_s: torch.Tensor  # [N] float64, log S = log sum_x exp(l_x - l_1)
    s_rtol: float = 0.0  # relative error bound of exp(log_s)
    entropies: dict[float, torch.Tensor] = field(default_factory=dict)  # H(p) by offset, computed when asked
    entropy_errors: dict[float, torch.Tensor] = field(default_factory=dict)  # [N] absolute error bound of each H
    rejected: list[Rejected] = field(default_factory=list)  # found in the pass, one per level function asked

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.top_logits.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.logits.device

    @property
    def lse(self) -> torch.Tensor:
        """log sum_x exp(logit_x), float64 ``[N]``."""
        return self.top_logits[:, 0].double() + self.log_s

    @property
    def top_logp(self) -> torch.Tensor:
        """log p of the top tokens, float64 ``[N, k]``."""
        return self.top_logits.double() - self.lse[:, None]

    @property
    def top_gaps(self) -> torch.Tensor:
        """a = l - l_1 of the top tokens, float64 ``[N, k]`` (exact for float32 logits: a float32 difference fits in
        float64 unless the two exponents differ by more than 29)."""
        top = self.top_logits.double()
        return top - top[:, :1]

    @classmethod
    def of(cls, logits: torch.Tensor, k: int = DEFAULT_TOP, entropy: bool = False) -> TargetStats:
        """:func:`gather` with the Shannon entropy when ``entropy`` and no rule's rejected token."""
        return gather(logits, k, offsets=(0.0,) if entropy else ())

    def view(self, rows: slice) -> TargetStats:
        """The statistics of a slice of rows (views, not copies)."""
        return TargetStats(
            self.logits[rows], self.top_logits[rows], self.top_index[rows], self.log_s[rows], self.s_rtol,
            {o: h[rows] for o, h in self.entropies.items()}, {o: e[rows] for o, e in self.entropy_errors.items()},
        )

    def ensure_top(self, k: int) -> None:
        """Gather at least the ``k`` most probable tokens of every row (capped at V)."""
        k = min(k, self.vocab_size)
        if k > self.k:
            n = len(self.logits)
            values = torch.empty(n, k, dtype=self.logits.dtype, device=self.device)
            index = torch.empty(n, k, dtype=torch.int64, device=self.device)
            for s in row_blocks(n, self.vocab_size):
                values[s], index[s] = top_k(self.logits[s], k)
            self.top_logits, self.top_index = values, index

    def entropy(self, offset: float = 0.0) -> torch.Tensor:
        """H(p) = -sum_x p(x) log(p(x) + offset) in nats, float64 ``[N]``; masked tokens contribute 0.

        ``offset = 0`` is the Shannon entropy; Medusa and vLLM's typical acceptance use ``offset = 1e-5``.
        """
        if offset not in self.entropies:
            h, err = _entropy(self.logits, self.top_logits[:, 0], self.log_s, self.s_rtol, offset)
            self.entropies[offset], self.entropy_errors[offset] = h, err
        return self.entropies[offset]

    def entropy_error(self, offset: float = 0.0) -> torch.Tensor:
        """Bound on the absolute error of :meth:`entropy`, float64 ``[N]`` (0 where the entropy was given)."""
        self.entropy(offset)
        return self.entropy_errors.get(offset, torch.zeros_like(self.log_s))

    def most_probable_rejected(self, reject_level: torch.Tensor, with_index: bool = False):
        """The most probable token with ``logit <= reject_level`` in each row (see :class:`Rejected`).

        Args:
            reject_level: ``[N]`` compute dtype, the largest logit a rule rejects.
            with_index: also find the token's index (the extremal drafter needs it; certificates do not).
        Returns:
            ``(logit [N], index [N] or None, found [N] bool)``; where ``found`` is False no token is rejected.
        """
        r = _rejected_in_top(self, reject_level, with_index)
        search = _to_search(self, r)
        if search.any():
            for s in row_blocks(*self.logits.shape):
                if search[s].any():
                    part = Rejected(r.level[s], r.logit[s], r.index[s] if with_index else None, r.found[s])
                    best, index, masked = _largest_at_or_below(self.logits[s], r.level[s, None], with_index)
                    _fill_rejected(self.logits[s], part, search[s], best[:, 0],
                                   None if index is None else index[:, 0], masked)
        return r.logit, r.index, r.found


def gather(
    logits: torch.Tensor,
    k: int = DEFAULT_TOP,
    offsets: Sequence[float] = (),
    levels: Sequence[Callable[[TargetStats], torch.Tensor]] = (),
    with_index: bool = False,
) -> TargetStats:
    """One blocked pass over ``logits [N, V]``: top-k, normaliser, the entropies asked and rejected tokens.

    Args:
        logits: ``[N, V]`` float32 or float64 (rows all -inf or holding NaN give NaN; the callers check the top
            logits, :func:`specert.theory.tensors.check_top`).
        k: top tokens to gather per row.
        offsets: the entropies H = -sum p log(p + offset) to compute (0: Shannon's, from the normaliser's sums).
        levels: functions from the statistics of a block of rows to their reject levels ``[b]`` (a rule's
            :meth:`~specert.theory.rules.SingleCandidateRule.reject_bound`); for each, the most probable rejected
            token of every row is found while the block is in cache, into ``stats.rejected``.
        with_index: find the rejected tokens' indices too.

    NOTE: the normaliser's sum of ``exp(logit - max)`` lies in [1, V]; its log is taken in float64. The entropy is
    ``log S - E_p[l - l_1]``, both from sums in the compute dtype (a float32 dot product, as in ``bmm``, loses about
    1e-4 nats over 150k tokens: its error grows with V, the cascaded sum's with log V).
    """
    n, vocab = logits.shape
    k = min(k, vocab)
    dev, dtype = logits.device, logits.dtype
    top_logits = torch.empty(n, k, dtype=dtype, device=dev)
    top_index = torch.empty(n, k, dtype=torch.int64, device=dev)
    log_s = torch.empty(n, dtype=torch.float64, device=dev)
    offsets = sorted(set(offsets))
    entropies = {o: torch.empty(n, dtype=torch.float64, device=dev) for o in offsets}
    errors = {o: torch.empty(n, dtype=torch.float64, device=dev) for o in offsets}
    s_rtol = normaliser_rtol(dtype, vocab)
    stats = TargetStats(logits, top_logits, top_index, log_s, s_rtol, entropies, errors)
    stats.rejected = [
        Rejected(
            torch.empty(n, dtype=dtype, device=dev),
            torch.empty(n, dtype=dtype, device=dev),
            torch.empty(n, dtype=torch.int64, device=dev) if with_index else None,
            torch.empty(n, dtype=torch.bool, device=dev),
        )
        for _ in levels
    ]
    shannon = 0.0 in offsets
    gaps = values = None  # [b, V] scratch, reused block to block
    for s in row_blocks(n, vocab):
        block = logits[s]  # [b, V]
        top = top_logits[s]
        top[:], top_index[s] = top_k(block, k)
        if gaps is None:
            gaps, values = torch.empty_like(block), torch.empty_like(block) if shannon else None
        a = gaps[: len(block)]
        torch.sub(block, top[:, :1], out=a)  # a = l - l_1 <= 0, -inf where masked
        e = torch.exp(a, out=values[: len(block)]) if shannon else a.exp_()  # exp(a) in [0, 1]
        log_s[s] = e.sum(-1).double().log()
        if shannon:
            # E_p[a] from sum exp(a) a; masked tokens give 0 * -inf = NaN, which nansum skips
            mean_gap = torch.nansum(a.mul_(e), -1).double() / torch.exp(log_s[s])  # [b] <= 0
            entropies[0.0][s] = log_s[s] - mean_gap
            # |error| <= |E_p[a]| (the relative errors of both sums, each term's (3 + |a|) u, |a| <= 104 where
            # float32's exp is not 0) + log S's, + the underflowed terms (at most V e^-104 104 / S in float32).
            errors[0.0][s] = 2 * (mean_gap.abs() * (s_rtol + 107 * unit_roundoff(dtype)) + s_rtol) + 1e-30 * vocab
        for o in offsets:
            if o != 0.0:
                entropies[o][s], errors[o][s] = _entropy(block, top[:, 0], log_s[s], s_rtol, o)
        if levels:
            view = stats.view(s)
            found = [_rejected_in_top(view, fn(view), with_index) for fn in levels]
            searches = [_to_search(view, r) for r in found]
            needed = [j for j, search in enumerate(searches) if search.any()]
            if needed:  # one search of the block for every level that needs it
                level = torch.stack([found[j].level for j in needed], -1)  # [b, J]
                best, index, masked = _largest_at_or_below(block, level, with_index)  # [b, J], [b, J] or None, [b]
                for col, j in enumerate(needed):
                    _fill_rejected(block, found[j], searches[j], best[:, col],
                                   None if index is None else index[:, col], masked)
            for r, out in zip(found, stats.rejected):
                for name in ("level", "logit", "index", "found"):
                    if getattr(r, name) is not None:
                        getattr(out, name)[s] = getattr(r, name)
    return stats


def _masked_max(block: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max { l in the row : l <= level } of ``block [b, V]`` for each column of ``level [b, J]``, and the row's
    minimum."""
    x = block[:, None, :]  # [b, 1, V]
    best = torch.where(x <= level[:, :, None], x, float("-inf")).amax(-1)  # [b, J], -inf where none
    return best, block.amin(-1)  # [b, J], [b]


class _CompiledOnce:
    """``fn`` compiled by ``torch.compile`` (dynamic shapes) on its first call; plain ``fn`` from the first failure
    on (no working compiler here), without trying to compile again."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception:  # noqa: BLE001 - no working compiler: plain torch gives the same values
                self.failed = True
        return self.fn(*args)


_COMPILED_MASKED_MAX = _CompiledOnce(_masked_max)


def masked_max(block: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest logit at or below each level, per row, and the row's smallest logit (-inf where a token is
    masked): ``block [b, V]``, ``level [b, J]`` -> ``([b, J], [b])``, -inf where a row has no logit at or below a
    level. Exact: a maximum does not round.

    NOTE: eager torch makes a comparison, a ``where`` and an ``amax`` pass per level, together about 1.1x
    ``logsumexp`` over the block; compiled (one fused loop over the block for all levels) about 0.1x per level
    (``python benchmarks/certificate_cost.py``). Blocks of at least ``COMPILE_MIN_ELEMENTS`` values on CPU or CUDA
    use the compiled kernel, compiled once per process (a few seconds, dynamic shapes); smaller blocks, other
    devices, a graph being compiled or a compiler that fails use eager torch, with the same result.
    """
    if (block.numel() >= COMPILE_MIN_ELEMENTS and block.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling()):
        return _COMPILED_MASKED_MAX(block, level)
    return _masked_max(block, level)


def _entropy(logits, top, log_s, s_rtol, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """H = -sum p log(p + offset) of logits ``[n, V]`` in float64, with a bound on its absolute error."""
    h = torch.empty_like(log_s)
    for s in row_blocks(*logits.shape):
        logp = logits[s].double() - (top[s].double() + log_s[s])[:, None]  # [b, V]
        probs = torch.exp(logp)
        if offset == 0.0:
            h[s] = -torch.nansum(probs * logp, -1)  # 0 * -inf = NaN where masked: skipped
        else:
            # float64: p + offset rounds too coarsely in float32 (3e-5 nats off at V = 150k)
            h[s] = -(probs * torch.log(probs + offset)).sum(-1)
    u = unit_roundoff(torch.float64)
    # float64 sums of V terms (depth < 128), each within (5 + |log p|) u of its value (log p >= -745 where p > 0);
    # and log S's error, which shifts every log p and so H by at most its size times (1 + H)
    err = h.abs() * ((REDUCTION_DEPTH + 750) * u + 2 * s_rtol) + 2 * s_rtol + 1e-300
    return h, err


def _rejected_in_top(stats: TargetStats, level: torch.Tensor, with_index: bool) -> Rejected:
    """The first gathered top token at or below ``level`` (found where one is)."""
    rejected = stats.top_logits <= level[:, None]  # [n, k]
    found = rejected.any(-1)
    first = rejected.int().argmax(-1, keepdim=True)  # the first rejected top token (0 where none)
    logit = stats.top_logits.gather(-1, first)[:, 0]
    index = stats.top_index.gather(-1, first)[:, 0] if with_index else None
    return Rejected(level, logit, index, found)


def _to_search(stats: TargetStats, r: Rejected) -> torch.Tensor:
    """Rows whose gathered top tokens are all accepted but whose other tokens may hold a rejected one."""
    if stats.k >= stats.vocab_size:
        return torch.zeros_like(r.found)
    return ~r.found


def _largest_at_or_below(block: torch.Tensor, level: torch.Tensor, with_index: bool):
    """For each column of ``level [b, J]`` the largest logit of each row of ``block [b, V]`` at or below it
    (``[b, J]``, -inf where none), its index (``[b, J]``, or None unless ``with_index``) and whether each row has a
    masked token (``[b]``). Without the index: :func:`masked_max`; with it (the extremal drafter): plain torch."""
    if not with_index:
        best, lowest = masked_max(block, level)
        return best, None, torch.isneginf(lowest)
    x = block[:, None, :]  # [b, 1, V]
    best, index = torch.where(x <= level[:, :, None], x, float("-inf")).max(-1)  # [b, J] each
    return best, index, torch.isneginf(block.amin(-1))


def _fill_rejected(block, r: Rejected, search, best, index, masked) -> None:
    """Fill ``r`` in place for the rows ``search`` of ``block [b, V]`` from the search's ``best [b]`` (the largest
    logit at or below the level), its ``index [b]`` (or None) and ``masked [b]`` (the row has a masked token): that
    logit; a masked token (-inf) where only masked tokens are rejected; not found where none is."""
    rows = search & ~torch.isneginf(r.level)  # rows where a finite logit may be rejected
    r.logit.copy_(torch.where(rows, best, r.logit))
    if index is not None:
        r.index.copy_(torch.where(rows, index, r.index))
    # No finite logit rejected: a masked token is, if the row has one (its logit is then -inf, as the level may be).
    none_finite = search & (~rows | torch.isneginf(r.logit))
    r.found |= search & ~none_finite
    if none_finite.any():
        r.found |= none_finite & masked
        r.logit.copy_(torch.where(none_finite, float("-inf"), r.logit))
        if index is not None:
            r.index.copy_(torch.where(none_finite, block.argmin(-1), r.index))
