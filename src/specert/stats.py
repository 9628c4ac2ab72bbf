"""What the certificates need to know about target distributions, computed in few passes over the vocabulary.

A certificate depends on the target distribution only through its normaliser, its few most probable tokens, the
most probable token a rule rejects and (for Medusa's rule) its entropy. ``TargetStats`` computes them for
``[N, V]`` logits with one ``topk`` and one ``exp`` pass, block by block so that each block stays in the CPU cache;
never a full sort. Everything after that works on ``[N, k]`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specert.tensors import row_blocks

# Top tokens gathered at first; more are gathered only where a water-filling runs past them.
DEFAULT_TOP = 16


@dataclass
class TargetStats:
    """Normaliser, top tokens and (when asked) entropy of target logits ``[N, V]``."""

    logits: torch.Tensor  # [N, V] compute dtype
    lse: torch.Tensor  # [N] float64, log sum_x exp(logit_x)
    top_logits: torch.Tensor  # [N, k] compute dtype, sorted descending
    top_index: torch.Tensor  # [N, k] int64
    row_min: torch.Tensor  # [N] compute dtype, smallest logit (-inf where a token is masked)
    _entropy: dict[float, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, logits: torch.Tensor, k: int = DEFAULT_TOP, entropy: bool = False) -> TargetStats:
        """One pass over ``logits [N, V]``: top-k, normaliser and, if ``entropy``, the Shannon entropy.

        NOTE: the normaliser's sum of ``exp(logit - max)`` lies in [1, V]; torch.sum's cascade keeps it to about
        1e-7 relative in float32, and the log is taken in float64 (``torch.logsumexp`` in float32 rounds its result
        to float32, about 1e-6 nats at |lse| ~ 10). The entropy is ``log S - E_p[logit - max]`` by the same sums
        (a float32 dot product, as in ``bmm``, loses about 1e-4 nats over 150k tokens).
        """
        n, vocab = logits.shape
        k = min(k, vocab)
        top_logits = torch.empty(n, k, dtype=logits.dtype)
        top_index = torch.empty(n, k, dtype=torch.int64)
        lse = torch.empty(n, dtype=torch.float64)
        row_min = torch.empty(n, dtype=logits.dtype)
        h = torch.empty(n, dtype=torch.float64)
        shifted, expd = None, None  # block buffers, reused
        for s in row_blocks(n, vocab):
            block = logits[s]
            torch.topk(block, k, dim=-1, out=(top_logits[s], top_index[s]))
            if shifted is None:
                shifted, expd = torch.empty_like(block), torch.empty_like(block)
            sh, e = shifted[: len(block)], expd[: len(block)]
            torch.sub(block, top_logits[s, :1], out=sh)  # [b, V], <= 0
            torch.exp(sh, out=e)
            total = e.sum(-1).double()  # [b], in [1, V]
            row_min[s] = block.amin(-1)
            lse[s] = top_logits[s, 0].double() + torch.log(total)
            if entropy:
                if torch.isneginf(row_min[s]).any():  # masked tokens: e = 0 there, keep 0 * -inf out of the sum
                    sh.clamp_(min=-1e4)
                h[s] = torch.log(total) - (e * sh).sum(-1).double() / total
        stats = cls(logits, lse, top_logits, top_index, row_min)
        if entropy:
            stats._entropy[0.0] = h
        return stats

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.top_logits.shape[-1]

    def ensure_top(self, k: int) -> None:
        """Gather at least the ``k`` most probable tokens of every row (capped at V)."""
        k = min(k, self.vocab_size)
        if k > self.k:
            n = len(self.logits)
            values = torch.empty(n, k, dtype=self.logits.dtype)
            index = torch.empty(n, k, dtype=torch.int64)
            for s in row_blocks(n, self.vocab_size):
                torch.topk(self.logits[s], k, dim=-1, out=(values[s], index[s]))
            self.top_logits, self.top_index = values, index

    @property
    def top_logp(self) -> torch.Tensor:
        """log p of the top tokens, float64 ``[N, k]``."""
        return self.top_logits.double() - self.lse[:, None]

    def entropy(self, offset: float = 0.0) -> torch.Tensor:
        """H(p) = -sum_x p(x) log(p(x) + offset) in nats, float64 ``[N]``; masked tokens contribute 0.

        ``offset = 0`` is the Shannon entropy; Medusa and vLLM's typical acceptance use ``offset = 1e-5``.
        """
        if offset not in self._entropy:
            h = torch.empty(len(self.logits), dtype=torch.float64)
            for s in row_blocks(*self.logits.shape):
                if offset == 0.0:
                    h[s] = TargetStats.of(self.logits[s], k=1, entropy=True)._entropy[0.0]
                else:
                    # float64: p + offset rounds too coarsely in float32 (3e-5 nats off at V = 150k)
                    probs = torch.softmax(self.logits[s].double(), dim=-1)  # [b, V]
                    h[s] = -(probs * torch.log(probs + offset)).sum(-1)
            self._entropy[offset] = h
        return self._entropy[offset]

    def most_probable_rejected(self, reject_level: torch.Tensor, with_index: bool = False):
        """The most probable token with ``logit <= reject_level`` in each row.

        Args:
            reject_level: ``[N]`` compute dtype, the largest logit a rule rejects.
            with_index: also find the token's index (the extremal drafter needs it; certificates do not).
        Returns:
            ``(logit [N], index [N] or None, found [N] bool)``; where ``found`` is False no token is rejected.
        """
        rejected = self.top_logits <= reject_level[:, None]  # [N, k]
        found = rejected.any(-1)
        first = rejected.int().argmax(-1, keepdim=True)  # the first rejected top token (0 where none)
        logit = self.top_logits.gather(-1, first)[:, 0]
        index = self.top_index.gather(-1, first)[:, 0] if with_index else None
        # Rows whose gathered top tokens are all accepted but which hold a rejected token further down.
        search = ~found & (reject_level >= self.row_min) & (self.k < self.vocab_size)
        for s in row_blocks(*self.logits.shape):
            need = search[s]
            if not need.any():
                continue
            rows = self.logits[s]  # [b, V]
            masked = torch.where(rows <= reject_level[s, None], rows, float("-inf"))
            if with_index:
                best, where = masked.max(-1)
                index[s] = torch.where(need, where, index[s])
            else:
                best = masked.amax(-1)
            logit[s] = torch.where(need, best, logit[s])
        found |= search
        if with_index:
            # Where only masked tokens (-inf) are rejected, max named an arbitrary token: name a masked one.
            only_masked = (search & torch.isneginf(logit)).nonzero()[:, 0]
            if len(only_masked):
                index[only_masked] = self.logits[only_masked].argmin(-1)
        return logit, index, found
