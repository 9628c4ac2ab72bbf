"""What the certificates need to know about target distributions, gathered in one pass over the vocabulary.

A certificate depends on the target distribution only through its normaliser, its few most probable tokens, the
most probable token a rule rejects and (for Medusa's rule) its entropy. :func:`gather` reads logits ``[N, V]``
block by block, twice while a block is in the CPU cache: its chunk maxima and row minima
(:func:`~specert.theory.tensors.chunk_extremes`, from which :func:`~specert.theory.tensors.top_k` takes the top
tokens), then one fused pass for the normaliser and the entropy (:func:`exp_sums`). Then the rules' reject levels
are computed for all rows at once and, only for the (row, rule) pairs where the rule rejects none of the gathered
top tokens, one :func:`masked_max` call reads those rows for the most probable token each rule rejects. Never a
full sort. Everything after that works on ``[N, k]`` tensors, on the device of the logits.

Notation (per row): l_1 >= l_2 >= ... the sorted logits, a_x = l_x - l_1 <= 0 the gaps to the top,
S = sum_x exp(a_x) in [1, V] the normaliser relative to the top (log-sum-exp = l_1 + log S), p_x = exp(a_x) / S.

NOTE on error bounds (what the certificates' rounding and the rules' conservative levels rely on): S is summed in
two stages. First over chunks of ``SUM_CHUNK`` = 64 consecutive tokens in the compute dtype (float32 for float32
logits: float64 costs 2-4x more): a sum of n non-negative terms is within (n - 1) u of its value in whatever order
it is added, so a compiled kernel may order it as it likes (u = half an ulp of 1: 2^-24 in float32, 2^-53 in
float64). Then the chunk sums in float64, by torch's cascade (16-element chunks over 4 levels plus 4 interleaved
and 8 vector lanes: depth D < 80 for V < 2^20, taken as ``REDUCTION_DEPTH`` = 128). Each term exp(a_x) carries
about (2 + |a_x|) u of relative error (the subtraction, and an exp within one ulp); weighted by the terms, |a_x|
averages E_p[l_1 - l] <= H(p) <= log V, so the relative error of S is at most
``(SUM_CHUNK + 3 + log V) u + REDUCTION_DEPTH 2^-53`` (:func:`normaliser_rtol`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specert.theory.tensors import FUSED_BLOCK_ELEMENTS, CompiledOnce, chunk_extremes, chunked, row_blocks, top_k

# Top tokens gathered at first; more are gathered only for the rows where a water-filling runs past them.
DEFAULT_TOP = 16
# Width of the chunks the normaliser is first summed over, and the depth of torch's sums over a row (the NOTE).
SUM_CHUNK = 64
REDUCTION_DEPTH = 128


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def normaliser_rtol(dtype: torch.dtype, vocab: int) -> float:
    """Bound on the relative error of S = sum_x exp(l_x - l_1) summed over ``vocab`` tokens by :func:`exp_sums`
    in ``dtype``."""
    return (SUM_CHUNK + 3 + math.log(vocab)) * unit_roundoff(dtype) + REDUCTION_DEPTH * unit_roundoff(torch.float64)


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
    masked: torch.Tensor | None = None  # [N] bool, the row has a masked token (-inf); None: not known yet

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
        r = self.find_rejected([reject_level], with_index)[0]
        return r.logit, r.index, r.found

    def find_rejected(self, levels: Sequence[torch.Tensor], with_index: bool = False) -> list[Rejected]:
        """The most probable token at or below each of ``levels`` (each ``[N]``, compute dtype) in every row.

        First among the gathered top tokens, for all levels at once. Where a row's top tokens lie all above a finite
        level (flat rows), that row is searched for that level, every such (row, level) pair in one
        :func:`masked_max` call; at a level of -inf only a masked token can be rejected, which needs no search.
        """
        if not levels:
            return []
        level = torch.stack(list(levels), -1)  # [N, J]
        rejected = self.top_logits[:, None, :] <= level[:, :, None]  # [N, J, k]
        found = rejected.any(-1)  # [N, J]
        first = rejected.int().argmax(-1)  # [N, J] the first rejected top token (0 where none)
        logit = self.top_logits.gather(-1, first)  # [N, J]
        index = self.top_index.gather(-1, first) if with_index else None
        search = ~found if self.k < self.vocab_size else torch.zeros_like(found)  # [N, J] top tokens all accepted
        if search.any():
            unbounded = torch.isneginf(level)  # [N, J] where only a masked token can be rejected
            row, col = (search & ~unbounded).nonzero().unbind(-1)  # [P] each: the pairs to search
            best, best_index = _largest_at_or_below(self.logits, row, level[row, col], with_index)  # [P] each
            logit[row, col] = best
            if with_index:
                index[row, col] = best_index
            # No finite logit rejected: a masked token is, if the row has one (its logit is -inf, as the level).
            none = search & (unbounded | torch.isneginf(logit))  # [N, J]
            found |= search & ~none
            if none.any():
                # the rows from the first to the last that need it: a view (scattered rows would be copied)
                rows = none.any(-1).nonzero()[:, 0]
                part = slice(rows[0].item(), rows[-1].item() + 1)
                masked = self.masked[part] if self.masked is not None else torch.isneginf(self.logits[part].amin(-1))
                found[part] |= none[part] & masked[:, None]
                logit.masked_fill_(none, float("-inf"))
                if with_index:
                    index[part] = torch.where(none[part], self.logits[part].argmin(-1)[:, None], index[part])
        return [Rejected(level[:, j], logit[:, j], None if index is None else index[:, j], found[:, j])
                for j in range(level.shape[-1])]


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
        levels: functions from the statistics to the reject levels ``[N]`` (a rule's
            :meth:`~specert.theory.rules.SingleCandidateRule.reject_bound`); for each, the most probable rejected
            token of every row is found (:meth:`TargetStats.find_rejected`), into ``stats.rejected``.
        with_index: find the rejected tokens' indices too.

    NOTE: the entropy is ``log S - E_p[a]``, E_p[a] = sum exp(a) a / S with both sums from :func:`exp_sums` (a
    float32 dot product, as in ``bmm``, would lose about 1e-4 nats over 150k tokens: its error grows with V, the
    chunked sum's with log V).
    """
    n, vocab = logits.shape
    k = min(k, vocab)
    dev, dtype = logits.device, logits.dtype
    top_logits = torch.empty(n, k, dtype=dtype, device=dev)
    top_index = torch.empty(n, k, dtype=torch.int64, device=dev)
    log_s = torch.empty(n, dtype=torch.float64, device=dev)
    masked = torch.empty(n, dtype=torch.bool, device=dev)
    offsets = sorted(set(offsets))
    entropies = {o: torch.empty(n, dtype=torch.float64, device=dev) for o in offsets}
    errors = {o: torch.empty(n, dtype=torch.float64, device=dev) for o in offsets}
    s_rtol = normaliser_rtol(dtype, vocab)
    shannon = 0.0 in offsets
    for s in row_blocks(n, vocab, FUSED_BLOCK_ELEMENTS):
        block = logits[s]  # [b, V]
        chunk_max, lowest = chunk_extremes(block)  # [b, V // 64], [b]
        masked[s] = torch.isneginf(lowest)
        top_logits[s], top_index[s] = top_k(block, k, chunk_max)
        total, gap_total = exp_sums(block, top_logits[s, 0], with_gaps=shannon)  # [b] float64 each
        log_s[s] = total.log()
        if shannon:
            mean_gap = gap_total / total  # E_p[a] <= 0, [b]
            entropies[0.0][s] = log_s[s] - mean_gap
            # |error| <= |E_p[a]| (the relative errors of both sums, each term's (3 + |a|) u, |a| <= 104 where
            # float32's exp is not 0) + log S's, + the underflowed terms (at most V e^-104 104 / S in float32).
            errors[0.0][s] = 2 * (mean_gap.abs() * (s_rtol + 107 * unit_roundoff(dtype)) + s_rtol) + 1e-30 * vocab
        for o in offsets:
            if o != 0.0:
                entropies[o][s], errors[o][s] = _entropy(block, top_logits[s, 0], log_s[s], s_rtol, o)
    stats = TargetStats(logits, top_logits, top_index, log_s, s_rtol, entropies, errors, masked=masked)
    stats.rejected = stats.find_rejected([fn(stats) for fn in levels], with_index)
    return stats


def _chunk_sums(chunks: torch.Tensor, top: torch.Tensor, with_gaps: bool):
    """sum exp(a) and (``with_gaps``) sum exp(a) a over each chunk of ``chunks [b, C, W]``, a = l - top: ``[b, C]``
    each (None for the second without gaps). a is clamped at -800, where exp is 0 in float32 and float64 alike,
    so that a masked token (-inf) adds 0 (not 0 * -inf = NaN)."""
    a = (chunks - top[:, None, None]).clamp(min=-800.0)  # [b, C, W]
    # exp written twice: compiled, one kernel computes it once (one exp with two readers is stored first)
    return a.exp().sum(-1), (a.exp() * a).sum(-1) if with_gaps else None


_COMPILED_CHUNK_SUMS = CompiledOnce(_chunk_sums)


def exp_sums(block: torch.Tensor, top: torch.Tensor, with_gaps: bool = False):
    """S = sum_x exp(a_x) and (``with_gaps``) sum_x exp(a_x) a_x, a = l - top, over each row of ``block [b, V]``
    (``top [b]`` its largest logits): float64 ``[b]`` each (None for the second without gaps).

    Summed in chunks of ``SUM_CHUNK`` tokens in the compute dtype, then over chunks in float64 (the error bound in
    the module's NOTE): one read of the block, compiled for large blocks (:class:`CompiledOnce`); eager torch
    would write a and exp(a) out first (3 passes over the block and 2 writes).
    """
    chunks, tail = chunked(block, SUM_CHUNK)  # [b, C, 64], [b, V % 64]
    parts = []
    if chunks.shape[1]:
        parts.append(_COMPILED_CHUNK_SUMS(chunks, top, with_gaps))
    if tail.shape[1]:
        parts.append(_chunk_sums(tail[:, None, :], top, with_gaps))  # the last, shorter chunk
    total = torch.cat([p[0] for p in parts], -1).double().sum(-1)  # [b]
    gaps = torch.cat([p[1] for p in parts], -1).double().sum(-1) if with_gaps else None
    return total, gaps


def _masked_max(logits: torch.Tensor, row: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """max { l in row ``row[p]`` of ``logits [N, V]`` : l <= ``level[p]`` } for each pair p: ``[P]``."""
    x = logits[row]  # [P, V]: compiled, read in place; plain torch copies
    return torch.where(x <= level[:, None], x, float("-inf")).amax(-1)  # [P], -inf where none


def _largest_by_blocks(logits: torch.Tensor, row: torch.Tensor, level: torch.Tensor, with_index: bool = False):
    """:func:`_masked_max` in plain torch, the pairs a block at a time (each block's rows are copied), with the
    index of each largest logit when ``with_index``: ``([P], [P] or None)``."""
    best = torch.empty_like(level)  # [P]
    index = torch.empty_like(row) if with_index else None  # [P]
    for s in row_blocks(len(row), logits.shape[-1]):
        x = logits[row[s]]  # [p, V]
        kept = torch.where(x <= level[s, None], x, float("-inf"))
        if with_index:
            best[s], index[s] = kept.max(-1)
        else:
            best[s] = kept.amax(-1)
    return best, index


def _masked_max_by_blocks(logits: torch.Tensor, row: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return _largest_by_blocks(logits, row, level)[0]


_COMPILED_MASKED_MAX = CompiledOnce(_masked_max, plain=_masked_max_by_blocks)


def masked_max(logits: torch.Tensor, row: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The largest logit at or below a level in a row, for pairs of them: ``logits [N, V]``, ``row [P]`` (int64),
    ``level [P]`` -> ``[P]``, -inf where the row has no logit at or below the level. Exact: a maximum does not round.

    NOTE: compiled (:class:`CompiledOnce`), one loop reads each pair's row in place, about 0.1x ``logsumexp``
    over that row per pair; plain torch copies the rows and makes a comparison, a ``where`` and an ``amax`` pass
    over the copy, 10-60x more (``python benchmarks/certificate_cost.py`` measures the certificates that depend
    on it).
    """
    return _COMPILED_MASKED_MAX(logits, row, level)


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


def _largest_at_or_below(logits: torch.Tensor, row: torch.Tensor, level: torch.Tensor, with_index: bool):
    """For each pair p, the largest logit of row ``row[p]`` of ``logits [N, V]`` at or below ``level[p]``: ``[P]``
    (-inf where none), and its index (``[P]``, or None unless ``with_index``). Without the index
    :func:`masked_max`; with it (the extremal drafter) plain torch, :func:`_largest_by_blocks`."""
    if with_index:
        return _largest_by_blocks(logits, row, level, with_index=True)
    return masked_max(logits, row, level), None
