"""Input handling shared by every public function: numpy or torch in, the same library out.

Public functions take logits (or log-probabilities: they are normalised here) of shape ``[..., V]`` in any float
dtype, as a torch tensor or a numpy array. Internally they work on a flat ``[N, V]`` torch tensor in a *compute
dtype* (float64 for float64 input, float32 otherwise) and return float64 (or bool) results shaped ``[...]``, in the
library of the input.

Large inputs are processed in blocks of rows small enough to stay in the CPU cache, so that the few passes a
function makes over a block read memory once.

Tensors stay on their device: everything here and in the modules above it is torch, on the device of the input
(numpy fast paths are taken for CPU tensors only). What was verified where: the test suite runs on CPU; the device
handling is the same code on CUDA, untested there; ``tests/test_layout.py`` checks that no module of
``specert.theory`` moves a tensor to the CPU or names the CPU device in a call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Elements per block of rows: 2**21 float32 values (8 MiB) with their float64 temporaries fit the last-level cache
# of common CPUs. Passes through compiled kernels, which write no temporaries of the block, take blocks of
# FUSED_BLOCK_ELEMENTS (32 MiB of float32): fewer kernel calls, each block still read from the cache a second time.
BLOCK_ELEMENTS = 2**21
FUSED_BLOCK_ELEMENTS = 2**23
# Inputs from this many values go through compiled kernels (see :class:`CompiledOnce`).
COMPILE_MIN_ELEMENTS = 2**16


@dataclass
class Logits:
    """Validated logits flattened to ``[N, V]`` plus what is needed to shape results back."""

    values: torch.Tensor  # [N, V], float32 or float64
    batch_shape: tuple[int, ...]
    numpy: bool  # the caller passed numpy: return numpy

    @property
    def vocab_size(self) -> int:
        return self.values.shape[-1]

    def output(self, result: torch.Tensor):
        """Reshape a per-row result ``[N, ...]`` to ``[*batch_shape, ...]`` in the caller's library."""
        result = result.reshape(self.batch_shape + tuple(result.shape[1:]))
        return result.numpy() if self.numpy else result


def as_logits(x, name: str, check_values: bool = True) -> Logits:
    """Convert and validate one logits argument; raise ``ValueError`` naming ``name`` if it is unusable.

    ``check_values=False`` skips the pass that looks for NaN, +inf and rows all -inf: the caller checks the top
    logits it gathers instead (:func:`check_top`), saving a pass over the vocabulary.
    """
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must hold floating-point logits, got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or a numpy array of logits, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floating-point logits, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have shape [..., V] with a vocabulary axis, got a scalar")
    vocab = x.shape[-1]
    if vocab < 2:
        raise ValueError(f"{name} has a vocabulary of {vocab} token(s); acceptance needs V >= 2")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    values = x.detach().to(dtype=compute_dtype).reshape(-1, vocab)
    if check_values and values.shape[0] > 0:
        check_top(values.amax(-1), name)  # amax is one cheap pass; NaN propagates through it
    return Logits(values, tuple(x.shape[:-1]), is_numpy)


def check_top(top: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if the largest logit of some row ``top [N]`` (from ``amax`` or
    ``topk``, through which NaN propagates as the largest value) shows NaN, +inf or a row that is all -inf."""
    bad = ~torch.isfinite(top)
    if not bad.any():
        return
    if torch.isnan(top).any():
        raise ValueError(f"{name} contains NaN; logits must be finite or -inf (a masked token)")
    if torch.isposinf(top).any():
        raise ValueError(f"{name} contains +inf; logits must be finite or -inf (a masked token)")
    raise ValueError(f"{name} has a row where every logit is -inf: no token has any probability")


def check_same_vocab(target: Logits, draft: Logits) -> None:
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"target_logits and draft_logits have different vocabularies ({target.vocab_size} vs "
            f"{draft.vocab_size} tokens); the drafter must score the target's vocabulary"
        )


def broadcast(target: Logits, draft: Logits) -> tuple[Logits, Logits]:
    """Broadcast the batch shapes of a target and a drafter against each other."""
    check_same_vocab(target, draft)
    if target.batch_shape == draft.batch_shape:
        return target, draft
    try:
        shape = torch.broadcast_shapes(target.batch_shape, draft.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"target_logits batch shape {list(target.batch_shape)} and draft_logits batch shape "
            f"{list(draft.batch_shape)} do not broadcast"
        ) from None

    def expand(lg: Logits) -> Logits:
        v = lg.values.reshape(lg.batch_shape + (lg.vocab_size,)).expand(shape + (lg.vocab_size,))
        return Logits(v.reshape(-1, lg.vocab_size), shape, lg.numpy)

    return expand(target), expand(draft)


def row_blocks(n_rows: int, vocab: int, elements: int | None = None) -> Iterator[slice]:
    """Slices of rows whose blocks hold about ``elements`` (by default ``BLOCK_ELEMENTS``) values each."""
    rows = max(1, (elements or BLOCK_ELEMENTS) // vocab)
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


# Width of the chunks :func:`top_k` takes the maximum of (see its NOTE).
TOPK_CHUNK = 64


class CompiledOnce:
    """``fn`` compiled by ``torch.compile`` on its first call with a first argument of at least
    ``COMPILE_MIN_ELEMENTS`` values on CPU or CUDA; ``plain`` (by default ``fn`` itself, the same values) for
    smaller inputs, other devices, inside a graph being compiled, and from a first failure on (no working compiler
    here) without trying to compile again.

    Every axis of the tensor arguments is compiled for any size except the last of the first argument, which
    stays fixed until a call shows another size (dynamo's automatic dynamic shapes): a fixed chunk width lets
    the compiler fuse the reductions over it."""

    def __init__(self, fn: Callable, plain: Callable | None = None):
        self.fn, self.plain, self.compiled, self.failed = fn, plain or fn, None, False

    def __call__(self, first: torch.Tensor, *rest):
        if (self.failed or first.numel() < COMPILE_MIN_ELEMENTS or first.device.type not in ("cpu", "cuda")
                or torch.compiler.is_compiling()):
            return self.plain(first, *rest)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn)
            for i, t in enumerate((first, *rest)):
                if isinstance(t, torch.Tensor):
                    for axis in range(t.ndim - (i == 0)):
                        torch._dynamo.maybe_mark_dynamic(t, axis)
            return self.compiled(first, *rest)
        except Exception:  # noqa: BLE001 - no working compiler: plain torch gives the same values
            self.failed = True
        return self.plain(first, *rest)


def chunked(block: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``block [b, V]`` cut into its whole chunks of ``width`` values, ``[b, V // width, width]`` (a view), and the
    tail past the last of them, ``[b, V % width]``."""
    whole = block.shape[-1] - block.shape[-1] % width
    return block[:, :whole].unflatten(-1, (whole // width, width)), block[:, whole:]


def _chunk_extremes(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return chunks.amax(-1), chunks.amin(-1)  # [b, C] each


_COMPILED_CHUNK_EXTREMES = CompiledOnce(_chunk_extremes)


def chunk_extremes(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maxima of the whole chunks of ``TOPK_CHUNK`` values of each row of ``block [b, V]`` (``[b, V // 64]``,
    what :func:`top_k` selects chunks by) and each row's smallest value (``[b]``), in one read of the block
    (compiled: :class:`CompiledOnce`; eager torch reads it twice)."""
    chunks, tail = chunked(block, TOPK_CHUNK)  # [b, C, 64], [b, V % 64]
    chunk_max, chunk_min = _COMPILED_CHUNK_EXTREMES(chunks)  # [b, C] each
    return chunk_max, torch.cat([chunk_min, tail], -1).amin(-1)  # [b, C], [b]


def top_k(block: torch.Tensor, k: int, chunk_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``block [b, V]`` and their indices, sorted descending, as
    ``torch.topk`` gives them (the same values; which of several equal values is named may differ).

    Through chunk maxima: the row is cut into chunks of ``TOPK_CHUNK`` values, the ``k`` chunks with the largest
    maxima are kept and ``topk`` runs on their ``k * TOPK_CHUNK`` values (and the tail past the last whole chunk).
    They hold the ``k`` largest values: a value above the k-th largest v_k sits in a chunk whose maximum exceeds
    v_k; were that chunk not kept, k kept chunks with larger maxima and it would hold k + 1 distinct values above
    v_k. If fewer than k chunks reach v_k, all of them are kept and hold every value >= v_k; otherwise each of the
    k kept ones holds one. NaN, the largest for ``topk`` and ``amax`` alike, comes first as with ``topk``.

    NOTE: torch's CPU ``topk`` over one row of 150k logits costs about as much as ``logsumexp`` over it (a
    selection per row, parallel across rows only), the chunk maxima about 0.07x of it (one vectorised ``amax``):
    ``python benchmarks/certificate_cost.py`` measures the certificates that depend on it. ``chunk_max``: the
    chunk maxima when already known (:func:`chunk_extremes`).
    """
    b, vocab = block.shape
    n_chunks = vocab // TOPK_CHUNK
    if n_chunks < 4 * k:
        return torch.topk(block, k, dim=-1)
    whole = n_chunks * TOPK_CHUNK
    if chunk_max is None:
        chunk_max = chunked(block, TOPK_CHUNK)[0].amax(-1)  # [b, C]
    kept = chunk_max.topk(k, dim=-1).indices  # [b, k] chunk numbers
    offsets = torch.arange(TOPK_CHUNK, device=block.device)  # [64]
    index = (kept[:, :, None] * TOPK_CHUNK + offsets).flatten(1)  # [b, k * 64] positions in the row
    if whole < vocab:
        tail = torch.arange(whole, vocab, device=block.device).expand(b, -1)  # [b, V - whole]
        index = torch.cat([index, tail], -1)  # [b, k * 64 + V - whole]
    values, where = block.gather(-1, index).topk(k, dim=-1)  # [b, k] each
    return values, index.gather(-1, where)


def map_blocks(fn: Callable[..., torch.Tensor], *arrays: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to matching row blocks of ``[N, V]`` tensors and concatenate the ``[n, ...]`` results."""
    n, vocab = arrays[0].shape
    if n == 0:
        return fn(*arrays)
    return torch.cat([fn(*(a[s] for a in arrays)) for s in row_blocks(n, vocab)])


def argmax(values: torch.Tensor) -> torch.Tensor:
    """Indices of the largest values along the last axis (the first on ties), int64.

    NOTE: numpy's ``argmax`` is vectorised, torch's CPU ``argmax`` (and ``topk``) is not: about 0.1 ms against a
    few microseconds for one row of 49k logits, which a decoder asks at every drafted and verified position.
    Inside a graph being compiled, or off the CPU, it is torch's."""
    if (values.dtype in (torch.float32, torch.float64) and values.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return torch.as_tensor(values.detach().numpy().argmax(-1))
    return values.argmax(-1)
