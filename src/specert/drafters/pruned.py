"""A pruned drafter: the target without its least useful layers, healed by distillation, served in int4.

A small standalone model for a target that has no smaller sibling: the target itself, cut and retrained.

1. **Which layers go**: the ``drop`` layers of lowest block influence (ShortGPT, Men et al. 2024, arXiv
   2403.03853), chosen at training time (:mod:`specert.train.pruning`); the file records the layers kept.
2. **Healing** (LoRA, Hu et al. 2021, arXiv 2106.09685): every Linear of every kept layer gets a rank-r update
   ``W + B A`` (B starts at 0, so training starts from the cut model) and the layers' RMSNorm weights are trained;
   everything else stays the target's. The objective is :mod:`specert.train.objectives`' (KL(p || q) to the
   target's full distribution, plus its certificate term), over the full vocabulary.
3. **Quantization-aware**: the drafter is served with int4 weights (:mod:`specert.decoding.quantized`), so training
   runs through the same grid: the forward uses ``Q4(W + B A)`` and the backward passes through the rounding as if
   it were not there (the straight-through estimator, Bengio et al. 2013). What is trained is what is served.

The file holds only what was trained (the factors A, B and the norm weights, float16) and the kept layers; the
rest is read from the target at load time, whose embedding checksum must match. Loading rebuilds the trainable
:func:`student` (the structure the factors belong to) and merges it into the int4 drafter that runs (:func:`served`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.functional import linear

from specert.decoding.quantized import fake_int4, quantized_copy, supported
from specert.drafters.model import layer_subset
from specert.drafters.storage import (
    PRUNED_FORMAT,
    check_fingerprint,
    read_drafter_file,
    shipped_file,
    write_drafter_file,
)


@dataclass(frozen=True)
class PrunedConfig:
    keep: tuple[int, ...]  # the target's decoder layers kept, in order
    rank: int  # LoRA rank r
    layers: int  # the target's decoder layer count
    vocab_size: int
    hidden: int
    target: str = ""  # the target's spec, for messages
    target_fingerprint: float = 0.0  # :func:`specert.drafters.storage.fingerprint` of the target
    trained: str = ""  # how it was trained, for the record


class LoRALinear(nn.Module):
    """``y = x Q4(W + B A)^T + b``: the target's frozen ``W`` (shared), a trained rank-r update, and the int4 grid
    applied with the straight-through estimator where the int4 kernel takes the shape (module docstring)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.weight_base = base.weight.detach()  # plain tensor: the target's, never trained nor saved
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = base.weight.dtype
        self.a = nn.Parameter(torch.randn(rank, base.in_features, dtype=dtype) / math.sqrt(base.in_features))  # [r, in]
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))  # [out, r]

    def merged(self) -> torch.Tensor:
        """``Q4(W + B A)`` (or ``W + B A`` for shapes that stay float), differentiable in A and B."""
        w = self.weight_base + self.b @ self.a  # [out, in]
        if not supported(w, 4):
            return w
        return w + (fake_int4(w.detach()) - w).detach()

    def forward(self, x):
        return linear(x, self.merged().to(x.dtype), self.bias)


def student(target: nn.Module, keep: tuple[int, ...], rank: int) -> nn.Module:
    """The trainable pruned model: ``target`` with layers ``keep`` copied and LoRA on their Linear layers; only the
    factors and the kept layers' norm weights require gradients."""
    model = layer_subset(target, list(keep), copy_layers=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, LoRALinear(module, rank))
        for module in layer.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.requires_grad_(True)
    return model


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes (what a checkpoint and the file hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def served(model: nn.Module) -> nn.Module:
    """The drafter as it runs: a trained :func:`student` with its updates merged (on the int4 grid), as an int4
    weight-only copy (LM head int8, as ``--drafter int4``), whose prompt path uses the same grid in float."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name, module in list(layer.named_modules()):
                if isinstance(module, LoRALinear):
                    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                    linear.weight = nn.Parameter(module.merged().detach().clone(), requires_grad=False)
                    if module.bias is not None:
                        linear.bias = module.bias
                    parent, _, child = name.rpartition(".")
                    setattr(layer.get_submodule(parent) if parent else layer, child, linear)
    for p in model.parameters():
        p.requires_grad_(False)
    return quantized_copy(model.eval(), 4)


def save_pruned(model: nn.Module, cfg: PrunedConfig, path) -> Path:
    """Write a trained :func:`student`'s updates to ``path`` (safetensors, float16, the config as metadata)."""
    tensors = {k: v.half().contiguous() for k, v in trained_state(model).items()}
    return write_drafter_file(path, tensors, PRUNED_FORMAT, asdict(cfg))


def shipped_pruned(target) -> Path:
    """The pruned drafter shipped in the package for ``target``."""
    return shipped_file(target, PRUNED_FORMAT, "pruned drafter",
                        "train one with `specert distill --architecture pruned` and use pruned:PATH")


def load_pruned(path, target, serve: bool = True) -> nn.Module:
    """The drafter saved at ``path`` for ``target`` (a :class:`~specert.decoding.models.LoadedModel`), as it runs
    (``serve``) or as the float :func:`student` it was trained as; refused with a clear error if it was trained for
    another target or vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no pruned drafter file {path}; train one with `specert distill --architecture pruned` "
                         "or use pruned (the shipped one)")
    raw, tensors = read_drafter_file(path, PRUNED_FORMAT, "pruned drafter")
    cfg = PrunedConfig(**{**raw, "keep": tuple(raw["keep"])})
    model = target.model
    layers = getattr(model.config, "num_hidden_layers", None)
    if cfg.vocab_size != target.vocab_size or cfg.hidden != model.config.hidden_size or cfg.layers != layers:
        raise ValueError(
            f"pruned drafter {path.name} was trained for a target with {cfg.vocab_size} tokens, hidden size "
            f"{cfg.hidden} and {cfg.layers} layers ({cfg.target}), but {target.name} has {target.vocab_size}, "
            f"{model.config.hidden_size} and {layers}: train one for it with `specert distill --architecture pruned`")
    check_fingerprint(f"pruned drafter {path.name}", cfg.target, cfg.target_fingerprint, target)
    built = student(model, cfg.keep, cfg.rank)
    expected = set(trained_state(built))
    if set(tensors) != expected:
        raise ValueError(f"{path} does not hold the updates of a pruned drafter for layers {list(cfg.keep)} at rank "
                         f"{cfg.rank} (missing {sorted(expected - set(tensors))[:3]}, unexpected "
                         f"{sorted(set(tensors) - expected)[:3]})")
    built.load_state_dict({k: v.to(model.dtype) for k, v in tensors.items()}, strict=False)
    built.pruned_config = cfg
    return served(built) if serve else built.eval()
