"""A run's inputs, checked before any model is loaded or any file is written: the paths it reads and writes, and
the drafters and rules its target must take (from what :func:`~specert.decoding.model_specs.check_model_spec` reads
of the target's header or config). Every check raises ``ValueError`` naming the input and what to do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from specert.decoding.model_specs import ModelSpecInfo, check_model_spec
from specert.decoding.schedules import Schedule, make_schedule
from specert.drafters.spec import architecture_problem, check_drafter_spec
from specert.drafters.storage import HEAD_FORMAT, PRUNED_FORMAT, SHIPPED
from specert.files import check_readable_file
from specert.theory.rules import Rule, rule


def _writable(folder: Path, name: str, path) -> None:
    """Refuse ``folder`` (an existing one) if a file cannot be made in it: a probe file, gone when closed."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{name} {path}: cannot write in {folder} ({e.strerror or e})") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``path`` made absolute first)."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def check_output_folder(path, name: str = "output folder") -> Path:
    """Refuse a folder that cannot be made or written: a file in its place or above it, a folder without write
    permission. Makes nothing; returns the path."""
    if not str(path).strip():
        raise ValueError(f"{name} is empty; give a folder")
    path = Path(path).expanduser()
    found = _nearest_existing(path)
    if not found.is_dir():
        where = "is a file" if found == path.absolute() else f"lies under {found}, which is a file"
        raise ValueError(f"{name} {path} {where}, not a folder; give another")
    _writable(found, name, path)
    return path


def check_output_file(path, name: str = "output file", suffix: str | None = None, make_folder: bool = False) -> Path:
    """Refuse a file that cannot be written: a wrong suffix, a folder in its place, a folder that is missing (unless
    ``make_folder``: the writer makes it) or read-only. Writes nothing; returns the path."""
    if not str(path).strip():
        raise ValueError(f"{name} is empty; give a file name")
    path = Path(path).expanduser()
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{name} {path}: give a {suffix} file name")
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give a file name")
    folder = path.absolute().parent
    found = _nearest_existing(folder)
    if not found.is_dir():
        raise ValueError(f"{name} {path} lies under {found}, which is a file, not a folder; give another path")
    if found != folder and not make_folder:
        raise ValueError(f"{name} {path}: no folder {folder}; make it first or give another path")
    _writable(found, name, path)
    return path


def check_input_file(path, name: str = "input file") -> Path:
    """Refuse a file that is missing, a folder, or unreadable; returns the path."""
    path = Path(path).expanduser()
    check_readable_file(path, f"{name} {path}")
    return path


def check_rules(rules, target: ModelSpecInfo) -> list[Rule]:
    """Parse the rules and, where the target's vocabulary is known, refuse widths it cannot take (``topm:m`` or
    ``tree:m`` with m >= V accepts every token)."""
    parsed = [rule(r) for r in rules]
    if target.vocab_size:
        for r in parsed:
            r.validate(target.vocab_size)
    return parsed


def check_length(tokens: int, target: ModelSpecInfo, what: str) -> None:
    """Refuse a run needing ``tokens`` positions where the target's context (where known) holds fewer."""
    if target.context_length and tokens >= target.context_length:
        raise ValueError(f"{what}: {tokens} positions needed, but {target.spec} has a context of "
                         f"{target.context_length} tokens; ask for fewer")


# The longest chain drafted where the target's context is not known (a chain of k is built as a list of k).
MAX_DRAFT = 4096


def check_draft_length(k, steps: int, target: ModelSpecInfo, what: str = "--k") -> None:
    """Refuse a chain length ``k`` (a whole number, or a spec such as ``auto``: not checked here) that cannot fit
    ``steps`` new tokens into the target's context, before a schedule of that length is built."""
    text = str(k).strip() if k is not None else ""
    if not text.isdigit():
        return
    if target.context_length is None and int(text) > MAX_DRAFT:
        raise ValueError(f"{what}: a chain of {text} tokens is longer than any useful one; give k <= {MAX_DRAFT}")
    check_length(steps + int(text) + 1, target, f"{what} with {steps} new tokens")


def check_shape(k, tree, steps: int, target: ModelSpecInfo, what: str) -> Schedule:
    """Refuse a draft shape (a chain ``k`` or tree widths ``tree``, as :func:`~specert.decoding.schedules.make_schedule`
    takes them) that does not parse, or whose drafts with ``steps`` new tokens overflow the target's context. The
    message starts with ``what`` (the option as given); returns the schedule."""
    check_draft_length(k, steps, target, what)
    try:
        schedule = make_schedule(k, tree)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    check_length(steps + schedule.max_nodes + 1, target, f"{what} with {steps} new tokens")
    return schedule


def _drafter_file(path: str, fmt: str, what: str, target: ModelSpecInfo) -> None:
    """A trained drafter's file: readable, of format ``fmt``, made for the target's vocabulary and layer count
    (its embedding checksum is checked when it is loaded)."""
    from safetensors import safe_open

    file = check_input_file(path, f"{what} file")
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        raise ValueError(f"{file} is not a {what} (not a safetensors file: {type(e).__name__})") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{file} is not a specert {what} (format {meta.get('format')!r}, expected {fmt!r})")
    try:
        cfg = json.loads(meta["config"])
    except (KeyError, ValueError):
        raise ValueError(f"{file}: its config does not parse; train it again with `specert distill`") from None
    for key, mine in (("vocab_size", target.vocab_size), ("layers", target.layers)):
        theirs = cfg.get(key)
        if mine and isinstance(theirs, int) and theirs != mine:
            raise ValueError(f"{file} was trained for a target with {key.replace('_', ' ')} {theirs} "
                             f"({cfg.get('target', '?')}), but {target.spec} has {mine}; train one for it with "
                             "`specert distill`")


def check_drafter(spec: str, target: ModelSpecInfo) -> None:
    """Refuse a drafter spec its target cannot take, before either is loaded: a model drafter's spec (the file or
    folder, the vocabulary), a trained drafter's file, layerskip's layer count, a shipped drafter for a target
    without one. The message names the drafter."""
    try:
        check_drafter_spec(spec)
        problem = architecture_problem(spec, target.architecture)
        if problem:
            raise ValueError(f"drafter {spec!r} cannot run on {target.spec!r} ({target.architecture}): {problem}")
        kind, _, arg = spec.partition(":")
        if kind == "compiled":
            return check_drafter(arg, target)
        if kind == "model":
            info = check_model_spec(arg)
            if info.vocab_size and target.vocab_size and info.vocab_size != target.vocab_size:
                raise ValueError(f"its vocabulary has {info.vocab_size} tokens but the target's {target.vocab_size}: "
                                 "a drafter must share the target's vocabulary")
        elif kind == "layerskip":
            if target.layers and not 1 <= int(arg) < target.layers:
                raise ValueError(f"layerskip:L needs 1 <= L < {target.layers} (the target's layer count)")
        elif kind == "ngram":
            if int(arg or 3) < 1:
                raise ValueError("ngram:N needs N >= 1")
        elif kind in ("head", "pruned"):
            fmt, what = (HEAD_FORMAT, "draft head") if kind == "head" else (PRUNED_FORMAT, "pruned drafter")
            if arg:
                _drafter_file(arg, fmt, what, target)
            elif target.spec not in SHIPPED[fmt]:
                raise ValueError(f"no {what} ships for target {target.spec!r} (only for {', '.join(SHIPPED[fmt])}); "
                                 f"train one with `specert distill` and give {kind}:PATH")
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(("drafter", "unknown drafter")) else
                         f"drafter {spec!r}: {message}") from None
