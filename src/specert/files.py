"""Writing files atomically: a reader, or a rerun after an interruption, finds the old file or the new, never half.

Every file specert writes (reports, run folders, traces, trained drafters, checkpoints) goes through
:func:`atomic_path`: the content is written to a hidden temporary file beside its destination, which then replaces
the destination in one ``os.replace``. A failure leaves the destination as it was and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (a file, or a folder the block creates); on leaving the block
    without an error it replaces ``path``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_path(folder / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
    ('done', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)  # left by an earlier process of the same id
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # a folder replaces a folder: the old one is moved aside first
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove a file or a folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent))


def write_parquet(path, table) -> None:
    """Write a pyarrow ``table`` to ``path`` atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def save_torch(path, obj) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_safetensors(path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (name -> contiguous tensor) with string ``metadata`` to a safetensors file atomically,
    creating its folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def check_readable_file(path: Path, label: str, what: str = "file") -> None:
    """Refuse a ``path`` that is a folder, missing or unreadable, with a one-line ``ValueError`` naming it as
    ``label`` (e.g. ``"prompt file /x.jsonl"``) and ``what`` it should be."""
    if path.is_dir():
        raise ValueError(f"{label} is a folder, not a {what}")
    if not path.is_file():
        raise ValueError(f"{label}: no such {what}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"{label}: cannot read it ({e.strerror or e})") from None
