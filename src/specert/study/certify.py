"""`specert certify`: logits read from other tools' files, and per-step records of certificates, margins and bounds."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from specert.theory.acceptance import accepts
from specert.theory.bounds import margin, margin_bounds
from specert.theory.certificates import certificate, drafter_certificate
from specert.theory.divergence import kl
from specert.theory.rules import Rule

SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _one_tensor(tensors: dict, path: Path):
    if "logits" in tensors:
        return tensors["logits"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    names = ", ".join(sorted(map(str, tensors))) or "none"
    raise ValueError(f"{path} holds {len(tensors)} tensors ({names}); save one, or name the logits 'logits'")


def _read(path: Path, suffix: str):
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _one_tensor(obj, path) if isinstance(obj, dict) else obj
    from safetensors.torch import load_file

    return _one_tensor(load_file(path), path)


def load_logits(path) -> torch.Tensor:
    """Logits ``[..., V]`` from a .npy, .pt/.pth (a tensor, or a dict with one tensor or a ``logits`` key) or
    .safetensors file (one tensor, or one named ``logits``): floating point, at least one row, V >= 2, every row
    with a finite logit and none NaN or +inf (-inf is a masked token). ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file of logits ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ValueError(f"could not read {path} ({e.strerror or _first_line(e)})") from None
    if suffix == ".npy" and not head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path} is not a .npy file (no numpy header); save the logits with numpy.save")
    if suffix in (".pt", ".pth") and not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ValueError(f"{path} is not a file torch.save wrote; save the logits with torch.save")
    try:
        x = _read(path, suffix)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds objects other than tensors, which are not read (weights_only); save a tensor "
                         "or a dict of tensors") from None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"could not read logits from {path} as {suffix} ({_first_line(e)})") from None
    except OSError as e:
        raise ValueError(f"could not read {path} ({e.strerror or _first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign file: say which, not where inside the loader)
        raise ValueError(f"could not read logits from {path} as {suffix} ({type(e).__name__}: {_first_line(e)})") \
            from None
    return check_logits(x, str(path))


def check_logits(x, name: str) -> torch.Tensor:
    """Refuse what is not logits ``[..., V]`` (module :func:`load_logits`' conditions); ``name`` for messages."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} does not hold an array of logits (found {type(x).__name__})")
    shape = list(x.shape)
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(f"{name}: logits must be a floating-point array of shape [..., V], got {x.dtype} {shape}")
    if shape[-1] < 2:
        raise ValueError(f"{name}: logits need V >= 2 tokens in their last dimension, got shape {shape}")
    if x.numel() == 0:
        raise ValueError(f"{name} holds no rows of logits (shape {shape}); give at least one row of V logits")
    rows = x.reshape(-1, shape[-1])
    bad = torch.isnan(rows) | (rows == float("inf"))
    if bad.any():
        row = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"{name}: row {row} holds NaN or +inf; logits must be finite, or -inf for a masked token")
    empty = torch.isneginf(rows).all(-1)
    if empty.any():
        row = int(empty.nonzero()[0])
        raise ValueError(f"{name}: row {row} masks every token (all -inf); each row needs a finite logit")
    return x


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def certify_records(target: torch.Tensor, rules: list[Rule], draft: torch.Tensor | None = None) -> list[dict]:
    """One record per (step, rule); steps are the flattened leading dimensions of ``target [..., V]``."""
    target = target.reshape(-1, target.shape[-1])
    if draft is not None:
        draft = draft.reshape(-1, draft.shape[-1])
        divergence, d_q = kl(target, draft), drafter_certificate(draft, 1)
    records = []
    per_rule = {}
    for r in rules:
        lower, upper = margin_bounds(target, r)
        per_rule[r.spec] = (certificate(target, r), margin(target, r), lower, upper,
                            accepts(target, draft, r) if draft is not None else None)
    for step in range(target.shape[0]):
        for r in rules:
            c, g, lo, up, ok = per_rule[r.spec]
            rec = {"step": step, "rule": r.spec, "certificate": float(c[step]), "margin": float(g[step]),
                   "lower": float(lo[step]), "upper": float(up[step])}
            if draft is not None:
                rec.update(kl=float(divergence[step]), **{"D_q(1)": float(d_q[step])},
                           certified=bool(divergence[step] < c[step]), accepted=bool(ok[step]))
            records.append(rec)
    return records
