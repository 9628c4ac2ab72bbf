"""Reading logits saved by other tools: .npy, .pt and .safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _one_tensor(tensors: dict, path: Path):
    if "logits" in tensors:
        return tensors["logits"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path} holds several tensors ({', '.join(sorted(tensors))}); name the logits 'logits'")


def load_logits(path) -> torch.Tensor:
    """Load logits ``[..., V]`` from a .npy, .pt/.pth (a tensor, or a dict with one tensor or a ``logits`` key)
    or .safetensors file (one tensor, or one named ``logits``). Raises ``ValueError`` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            x = _one_tensor(obj, path) if isinstance(obj, dict) else obj
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            x = _one_tensor(load_file(path), path)
        else:
            raise ValueError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    except ValueError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, not where deep inside the loader it broke
        raise ValueError(f"could not read logits from {path}: {e}") from None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{path} does not hold a tensor of logits (found {type(x).__name__})")
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(
            f"{path}: logits must be a floating-point array of shape [..., V], got {x.dtype} {list(x.shape)}"
        )
    return x
