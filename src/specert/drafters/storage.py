"""Drafters stored as files: the safetensors format specert writes trained drafters in, the files shipped in the
package for the embedded default, and the target fingerprint that keeps a drafter to the target it was trained for.

A drafter file holds its tensors and, in the safetensors metadata, ``format`` (what kind of drafter) and ``config``
(JSON: its configuration, the target's spec and :func:`fingerprint`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from specert.files import save_safetensors

HEAD_FORMAT = "specert-draft-head/1"
PRUNED_FORMAT = "specert-pruned-drafter/1"
# The drafters shipped in specert/drafters/weights: target spec -> file name, per format.
SHIPPED = {
    HEAD_FORMAT: {"smollm2-135m": "smollm2-135m.safetensors"},
    PRUNED_FORMAT: {"smollm2-135m": "smollm2-135m-pruned.safetensors"},
}


def fingerprint(model: torch.nn.Module) -> float:
    """A checksum of a model's input embedding: every 97th row summed in float64 (tells targets apart)."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach()[::97].double().sum())


def shipped_file(target, fmt: str, what: str, how: str) -> Path:
    """The drafter file of format ``fmt`` shipped in ``specert/drafters/weights`` for ``target`` (a
    :class:`~specert.decoding.models.LoadedModel`); ``what`` and ``how`` (to train one) word the error for other
    targets."""
    shipped = SHIPPED[fmt]
    name = shipped.get(target.name)
    if name is None:
        raise ValueError(f"no {what} ships for target {target.name!r} (only for {', '.join(shipped)}); {how}")
    return Path(__file__).parent / "weights" / name


def write_drafter_file(path, tensors: dict[str, torch.Tensor], fmt: str, config: dict) -> Path:
    """Write a drafter file (safetensors, atomically): ``tensors`` and, as metadata, ``fmt`` and ``config``."""
    return save_safetensors(path, tensors, {"format": fmt, "config": json.dumps(config)})


def read_drafter_file(path: Path, fmt: str, what: str) -> tuple[dict, dict]:
    """(config, tensors) of a drafter file written by specert (safetensors, format ``fmt`` and a JSON config in its
    metadata); a clear error for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a corrupt file)
        raise ValueError(f"{path} is not a {what} ({type(e).__name__}: {e})") from None
    if meta.get("format") != fmt:
        found = meta.get("format")
        hint = "; it is a draft head: use head:PATH" if found == HEAD_FORMAT else ""
        raise ValueError(f"{path} is not a specert {what} (format {found!r}, expected {fmt!r}){hint}")
    return json.loads(meta["config"]), tensors


def check_fingerprint(what: str, trained_for: str, checksum: float, target) -> None:
    """Refuse a drafter trained for another target (its :func:`fingerprint` differs)."""
    mine = fingerprint(target.model)
    if not math.isclose(mine, checksum, rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(f"{what} was trained for another target ({trained_for}; embedding checksum {checksum:.6g}), "
                         f"not {target.name} (checksum {mine:.6g}): train one with `specert distill`")


