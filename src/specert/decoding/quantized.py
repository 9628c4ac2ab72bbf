"""Weight-only quantized copies of a model: the target as its own cheap, close drafter.

Decoding one token on a CPU is memory-bound: every forward reads every weight (540 MB for a 135M float32
model). A copy whose Linear weights are stored as 4- or 8-bit integers reads 4-8x less, and since only the
weights are rounded (activations stay in floating point) it stays close to the target, unlike a copy quantized
per activation tensor. As in gpt-fast's ``quantize.py`` (int8 and int4 weight-only), the products run in torch's
packed-integer CPU kernels with bfloat16 activations (the float32 path of those kernels is ~10x slower).

int4, groups of g = 32 consecutive input weights of a row (GGUF's Q4_1 layout)::

    w = d * q + m,    q in {0, .., 15},    d = (max - min) / 15,    m = min over the group

torch's kernel computes ``(q - 8) * s + z`` per group, so ``s = d`` and ``z = m + 8 d``. For weights that were
Q4_1 to begin with (the embedded SmolLM2 GGUF's decoder layers) the grid is the original one and the integers are
recovered exactly; what differs from the target is bfloat16 rounding (of the activations, and of s and z, which
the kernel takes in the activations' type).

int8, one scale per output row (symmetric)::

    w = s * q,    q in {-127, .., 127},    s = max |w| / 127

``int4`` quantizes the decoder's Linear layers to int4 and the LM head to int8 (tied embeddings are rarely stored
as Q4_1, and 4 bits on the LM head cost the most agreement); ``int8`` quantizes all of them to int8. Layers whose
shape the kernels do not take (in_features not a multiple of 32; for int4 also out_features not a multiple of 16)
stay float.

The integer kernels are made for a few rows at a time (decoding); a prompt of hundreds of tokens is compute-bound
and runs faster through a float matrix product. Inputs of ``PREFILL_ROWS`` rows or more therefore use the
original float weight, which the copy shares with the model it was made from (no extra memory).
"""

from __future__ import annotations

import copy

import torch

from specert.decoding.forward import can_step

GROUP = 32
ACTIVATIONS = torch.bfloat16
PREFILL_ROWS = 16


def _kernels_available(bits: int) -> bool:
    ops = torch.ops.aten
    names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu") if bits == 4 else (
        "_weight_int8pack_mm",)
    return all(hasattr(ops, n) for n in names)


def supported(weight: torch.Tensor, bits: int) -> bool:
    """Whether torch's CPU kernel takes a ``[out, in]`` weight at this width (other shapes stay float)."""
    out_features, in_features = weight.shape
    return in_features % GROUP == 0 and (bits == 8 or out_features % 16 == 0)


def int4_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 grid of a ``[n, k]`` weight (module docstring): integers q ``[n, k]`` (int32), steps d and minima m
    ``[n, k / GROUP]``. Both ends of a group are on its grid (q = 0 and 15), so the grid of :func:`fake_int4`'s
    output is this one again."""
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    d = (high - low) / 15
    d = torch.where(d > 0, d, torch.ones_like(d))  # a constant group: q = 0, w = m
    q = ((groups - low[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, d, low


def fake_int4(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its int4 grid, in floating point: d q + m (what :class:`Int4Linear` computes with)."""
    n, k = w.shape
    q, d, low = int4_grid(w)
    return (q.view(n, k // GROUP, GROUP).to(w.dtype) * d[..., None] + low[..., None]).view(n, k)


class QuantizedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W stored in integers (subclasses hold them and run the product); inputs of
    ``PREFILL_ROWS`` rows or more run on the shared float weight."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.float_weight = linear.weight  # shared with the original model, for prompts
        self.out_features, self.in_features = linear.weight.shape

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for ``x [rows, in]`` in ``ACTIVATIONS``, from the stored integers."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if len(flat) >= PREFILL_ROWS:
            return torch.nn.functional.linear(x, self.float_weight, self.bias)
        y = self.product(flat.to(ACTIVATIONS)).view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(QuantizedLinear):
    """W stored as 4-bit groups (see the module docstring for the grid)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        q, d, low = int4_grid(linear.weight.detach().float())
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [in / g, out, 2]: scale and zero of each group, as the kernel reads them
        self.register_buffer("scales_and_zeros", torch.stack([d.t(), (low + 8 * d).t()], -1).to(ACTIVATIONS))

    def product(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)


class FusedInt4(torch.nn.Module):
    """Int4 layers that read the same input (q, k, v; gate, up) run as one product: one kernel call instead of
    several, as gpt-fast's fused ``wqkv``. Groups run along a row, so the stacked rows have the parts' own grids and
    the outputs are the parts' outputs exactly. ``forward`` returns them as a tuple; prompts (``PREFILL_ROWS`` rows
    or more) run through the parts."""

    def __init__(self, parts: list[Int4Linear]):
        super().__init__()
        self.parts = tuple(parts)  # the parent's modules, not registered again
        self.sizes = [part.out_features for part in parts]
        whole = torch.nn.Linear(parts[0].in_features, sum(self.sizes), bias=False)
        whole.weight = torch.nn.Parameter(torch.cat([part.float_weight for part in parts]), requires_grad=False)
        self.stacked = Int4Linear(whole)
        self.stacked.float_weight = None  # few rows only: prompts run through the parts

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, ``[..., sum of their out_features]``."""
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) >= PREFILL_ROWS:
            return torch.cat([part(x) for part in self.parts], -1)
        return self.stacked.product(flat.to(ACTIVATIONS)).to(x.dtype).view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whole(x).split(self.sizes, -1)


class Int8Linear(QuantizedLinear):
    """W stored as int8 rows, one scale per row (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        s = w.abs().amax(1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        self.register_buffer("weight_int8", (w / s[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", s.to(ACTIVATIONS))

    def product(self, x):
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)


def quantized_copy(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A copy of ``model`` whose Linear layers hold int4 (LM head: int8) or int8 weights; ``model`` is unchanged.

    The copy keeps the model's class, config and generation methods, so transformers' assisted generation takes it
    as ``assistant_model`` too.
    """
    if bits not in (4, 8):
        raise ValueError(f"weight-only quantization takes 4 or 8 bits, got {bits}")
    if not _kernels_available(bits):
        raise ValueError(f"this torch ({torch.__version__}) has no int{bits} weight-only CPU kernels; "
                         "install torch>=2.6 (./install.sh does)")
    # copy everything but the Linear layers' parameters, which the copy shares (quantized layers keep them for
    # prompts; layers the kernels do not take run on them)
    memo = {id(p): p for _, m in _linears(model) for p in m.parameters()}
    copied = copy.deepcopy(model, memo)
    head = copied.get_output_embeddings()
    for name, module in _linears(copied):
        width = 8 if (bits == 8 or module is head) else 4
        if supported(module.weight, width):
            parent, _, child = name.rpartition(".")
            replacement = (Int4Linear if width == 4 else Int8Linear)(module)
            setattr(copied.get_submodule(parent) if parent else copied, child, replacement)
    for layer in copied.model.layers if can_step(copied) else ():  # fused products for the fast path
        for block, name, parts in ((layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj")),
                                   (layer.mlp, "gate_up", ("gate_proj", "up_proj"))):
            found = [getattr(block, part, None) for part in parts]
            if all(type(f) is Int4Linear and f.bias is None for f in found):
                setattr(block, name, FusedInt4(found))
    return copied


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
