"""The forward passes the decoder needs: with a KV cache, for a chain or a tree, through transformers' forward or,
for the families whose layers it knows, through :func:`decode_step`, the same modules without transformers'
per-call machinery.

Glossary: a *cache* is a transformers ``DynamicCache`` (or :class:`~specert.decoding.static_cache.StaticCache`);
``past`` is the number of tokens it holds; ``attend [n, past + n]`` (bool) says which cached slots and new tokens
each new token sees (a tree's ancestor structure; default causal).

Families: any decoder-only model transformers loads runs through its own forward. Speculative decoding also needs
the cache rolled back to the accepted tokens (:func:`keep_cache`), which :func:`new_cache` makes possible for every
model whose layers keep one key and value per token (full or sliding-window attention): it keeps every token in
every layer, the window applied by the mask alone. Models with recurrent, convolutional or shared states in their
cache cannot be rolled back (:func:`rollback_problem` says so); a tree needs the model's forward to take a 4D mask
(:func:`tree_problem`). :func:`decode_step`, the fast path, runs the families whose layers it knows.

One module: transformers' forward and :func:`decode_step` are two implementations of one call, chosen per call by
:func:`forward_features`, that must leave the same cache under the same mask; they stay side by side so that a change
to one is read next to the other.
"""

from __future__ import annotations

import functools
import inspect
import time

import torch

# Cache layer types holding one key and value per token: a cache of them can be cropped, and a tree's path moved
# into place, token by token.
TOKEN_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def layer_types(model) -> list[str]:
    """The cache layer type of each decoder layer of ``model`` (``full_attention``, ``sliding_attention``, ``conv``,
    ``linear_attention``, ...), as transformers' ``DynamicCache`` reads them from the config."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0])


def sliding_windows(model) -> set[int]:
    """The windows of ``model``'s sliding-window layers (empty without any): a token at position i of such a layer
    sees positions j with ``i - j < window``."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return {int(k["sliding_window"]) for k in kwargs if k.get("sliding_window")}


def new_cache(model):
    """An empty KV cache for ``model``: transformers' ``DynamicCache``, whose layers keep every token when every
    layer's cache holds keys and values (:data:`TOKEN_LAYER_TYPES`), sliding-window layers included.

    NOTE: transformers' own cache for a sliding-window layer keeps only its last ``window - 1`` tokens and counts
    the others; cropping it cannot bring back what it dropped, so a rejected draft would leave it short of tokens
    the window still covers. Kept whole, the layer computes the same attention (its mask applies the window) at the
    cost of attending over the whole context instead of the window. Other models (recurrent or convolutional
    states, layers sharing another's cache) get the config's own cache: they decode without a drafter.
    """
    from transformers import DynamicCache

    if set(layer_types(model)) <= TOKEN_LAYER_TYPES:
        return DynamicCache()  # a DynamicLayer, every token, per layer
    return DynamicCache(config=model.config)


def rollback_problem(model) -> str | None:
    """Why ``model``'s KV cache cannot be rolled back to the accepted tokens after a verification (which
    speculative decoding needs, whatever the drafter), or None if it can."""
    other = sorted(set(layer_types(model)) - TOKEN_LAYER_TYPES)
    if other:
        return (f"its cache holds {'/'.join(other)} layers (recurrent or shared state, not one key and value per "
                "token), which cannot be rolled back to the accepted tokens; decode without a drafter")
    return None


# Attribute of a model holding what :func:`tree_problem` found for it.
TREE_ATTRIBUTE = "specert_tree_problem"


def tree_problem(model) -> str | None:
    """Why ``model`` cannot verify (or draft) a tree of tokens in one forward, or None if it can.

    A tree needs the model's forward to take a 4D attention mask (each node sees its ancestors, not its siblings)
    with position ids. :func:`can_step` models run trees in :func:`decode_step`; for the others, what their forward
    does with such a mask is checked once per model (the answer kept on it): a root and two sibling nodes after a
    context of two tokens, in one forward under the tree's mask, must give the second sibling the logits it gets
    run alone after the root. A model whose forward builds its own mask (ALiBi biases from a 2D padding mask, say)
    fails that check."""
    if can_step(model):
        return None
    if hasattr(model, TREE_ATTRIBUTE):
        return getattr(model, TREE_ATTRIBUTE)
    problem = rollback_problem(model)
    if problem is None and len(sliding_windows(model)) > 1:
        problem = f"its sliding-window layers have different windows {sorted(sliding_windows(model))}"
    if problem is None:
        problem = _check_tree_forward(model)
    setattr(model, TREE_ATTRIBUTE, problem)
    return problem


def _check_tree_forward(model) -> str | None:
    """:func:`tree_problem`'s check of the forward itself (a few tokens' forwards)."""
    context, root, a, b = [1, 2], 3, 4, 5
    attend = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)  # root, a, b
    try:
        cache = new_cache(model)
        forward(model, cache, context)
        got = forward(model, cache, [root, a, b], [2, 3, 3], attend)[2]  # [V]
        want = forward(model, new_cache(model), context + [root, b])[-1]  # [V]
        wrong = forward(model, new_cache(model), context + [root, a, b])[-1]  # [V] b having seen its sibling a
    except Exception as e:  # noqa: BLE001 (whatever the model's forward raises on a 4D mask)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return f"its forward does not take a tree attention mask ({type(e).__name__}: {first}); draft chains instead"
    # NOTE: a copy with integer weights and bfloat16 activations (int4, int8) gives a token's logits that differ by
    # ~1% of their range between a forward of 2 rows and one of 3 (Gemma 3 270M: 0.5 in 61, against 18 for seeing
    # the sibling): its error is measured against what seeing the sibling changes. Float models meet the plain
    # tolerance.
    error, sibling = float((got - want).abs().max()), float((want - wrong).abs().max())
    if not (torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())) or error < 0.1 * sibling):
        return "its forward does not apply a tree attention mask (a node saw its sibling); draft chains instead"
    return None


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
    if not last_only and can_step(model) and cache_length(cache):
        return decode_step(model, cache, tokens, positions, attend, layers)
    ids = torch.tensor([tokens], dtype=torch.long)
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions], dtype=torch.long)
    if attend is not None:
        past = cache_length(cache)
        kwargs["attention_mask"] = tree_mask(model, attend, positions or range(past, past + len(tokens)))
        kwargs["cache_position"] = torch.arange(past, past + len(tokens))
    if last_only and "logits_to_keep" in _forward_parameters(type(model)):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, output_hidden_states=bool(layers), **kwargs)
    logits = out.logits[0]
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    feats = torch.cat([out.hidden_states[i][0] for i in layers], -1).float() if layers else None
    return logits, feats


def tree_mask(model, attend: torch.Tensor, positions) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` of a transformers forward running tokens at ``positions [n]`` under ``attend [n,
    slots]`` (True: attended): an additive 4D mask ``[1, 1, n, slots]`` in the model's dtype, which transformers
    uses as given, for every layer.

    Sliding-window layers must see the window too: a model whose layers all slide gets ``attend`` within the window
    (``position - slot < window``); one mixing full and sliding layers gets a mask per layer type, which transformers'
    models with ``layer_types`` take as a dict. NOTE: a cached tree node's slot is never below its position (a node
    at depth d sits at slot ``base + i``, position ``base + d``, ``i >= d``), so the window, measured to slots, holds
    every ancestor while a tree is shallower than the window; context slots are their positions."""
    dtype = next(model.parameters()).dtype

    def additive(allowed):  # [n, slots] bool -> [1, 1, n, slots]
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    windows = sliding_windows(model)
    if not windows:
        return additive(attend)
    near = torch.as_tensor(list(positions))[:, None] - torch.arange(attend.shape[1])[None] < min(windows)
    windowed = additive(attend & near)
    if set(layer_types(model)) == {"sliding_attention"}:
        return windowed
    return {"full_attention": additive(attend), "sliding_attention": windowed}


# Decoder families whose layers :func:`decode_step` runs directly (pre-norm RMSNorm, rotary, full attention, GQA,
# gated MLP; qwen2's q, k, v biases and qwen3's q, k norms).
STEP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def can_step(model) -> bool:
    """Whether :func:`decode_step` can run ``model`` (otherwise use :func:`forward`): a family it knows, every layer
    full attention (no sliding window)."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in STEP_MODEL_TYPES and not getattr(config, "sliding_window", None)
            and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
            and hasattr(getattr(model, "model", None), "rotary_emb"))


# Attribute of a model holding the layout :func:`choose_layout` measured for it (read by :func:`layout`).
LAYOUT_ATTRIBUTE = "specert_columns"


def choose_layout(model, rows: tuple[int, ...] = (1, 4), repeats: int = 3, clock=time.perf_counter,
                  seed: int = 0) -> bool:
    """Time a pass over ``model``'s float32 Linear weights in both of :func:`linear`'s layouts, a few rows at a
    time, and record the faster one on the model (:func:`layout` reads it; views and copies of the model share
    it). :func:`~specert.decoding.models.load_model` calls it on each model it loads (0.5 s for the embedded one).
    Returns whether ``(W x^T)^T`` won.

    NOTE: which layout reads a weight faster depends on the CPU and its BLAS. Over the embedded model's 211 weights
    (538 MB), one row / four rows, one 2-core machine took 45 / 55 ms as ``x W^T`` and 20 / 27 ms as ``(W x^T)^T``,
    another 21.9 / 35.3 ms against 51.8 / 52.5 ms: hard-coding either makes the target's one-token forward 2x
    slower on the other machine (``python benchmarks/speed.py`` prints both). The weights are read in order, as a
    forward reads them, so most come from memory, not cache; the inputs are drawn from a generator seeded by
    ``seed``.
    """
    weights = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    if not weights:
        setattr(model, LAYOUT_ATTRIBUTE, False)
        return False
    seconds = {}
    generator = torch.Generator().manual_seed(seed)
    inputs = {n: {w.shape[1]: torch.randn(n, w.shape[1], generator=generator) for w in weights} for n in rows}
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
    columns = seconds[True] < seconds[False]
    setattr(model, LAYOUT_ATTRIBUTE, columns)
    return columns


def layout(model) -> bool:
    """Whether :func:`linear` runs ``model``'s float32 products as ``(W x^T)^T`` (:func:`choose_layout`; False for
    a model it did not time)."""
    return bool(getattr(model, LAYOUT_ATTRIBUTE, False))


def _product(weight: torch.Tensor, rows: torch.Tensor, columns: bool) -> torch.Tensor:
    """``rows W^T`` for ``rows [n, in]``, as ``(W rows^T)^T`` (one row doubled into two columns) if ``columns``."""
    if not columns:
        return torch.nn.functional.linear(rows, weight)
    n = len(rows)
    return (weight @ (rows if n > 1 else torch.cat([rows, rows])).t())[:, :n].t().contiguous()


def linear(module, x: torch.Tensor, columns: bool) -> torch.Tensor:
    """``module(x)`` for a Linear layer and a few rows ``x [..., in]``; a float32 ``nn.Linear`` runs as ``x W^T``
    or, if ``columns`` (the model's :func:`layout`), as ``y = (W x^T)^T + b`` with one row doubled into two columns
    (one column takes a slow matrix-vector path).

    The same product either way, summed in another order. Other modules (quantized copies) and dtypes run as they
    are.
    """
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


def rotary(cos: torch.Tensor, sin: torch.Tensor):
    """``rotate(x)`` = transformers' ``x cos + rotate_half(x) sin`` for ``x [1, n, heads, d]`` and ``cos``, ``sin``
    ``[1, n, d]``, as ``x cos + x[..., perm] sin'`` with rotate_half's sign folded into ``sin'`` (3 operations
    instead of 7, the same values)."""
    d = cos.shape[-1]
    perm = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
    sign = torch.cat([torch.full((d // 2,), -1.0), torch.ones(d // 2)]).to(sin.dtype)
    cos, sin = cos[:, :, None], (sin * sign)[:, :, None]
    return lambda x: x * cos + x[..., perm] * sin


def _attention_inputs(attn, h: torch.Tensor, rotate, columns: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys (both rotated) and values ``[1, heads, n, d]`` of ``h [1, n, hidden]``. An int4 copy's q, k,
    v come out of one product (:class:`~specert.decoding.quantized.FusedInt4`), and its q and k, side by side there, are
    rotated together."""
    n, d = h.shape[1], attn.head_dim
    if hasattr(attn, "qkv") and not hasattr(attn, "q_norm"):
        heads = attn.qkv.whole(h).view(1, n, -1, d)
        nq, nk = attn.config.num_attention_heads, attn.config.num_key_value_heads
        qk = rotate(heads[:, :, : nq + nk])
        q, k, v = qk[:, :, :nq], qk[:, :, nq:], heads[:, :, nq + nk :]
    else:
        q, k, v = attn.qkv(h) if hasattr(attn, "qkv") else (linear(attn.q_proj, h, columns),
                                                              linear(attn.k_proj, h, columns),
                                                              linear(attn.v_proj, h, columns))
        q, k, v = q.view(1, n, -1, d), k.view(1, n, -1, d), v.view(1, n, -1, d)
        if hasattr(attn, "q_norm"):  # qwen3 normalises each head's queries and keys
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q, k = rotate(q), rotate(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _mlp(mlp, x: torch.Tensor, columns: bool) -> torch.Tensor:
    """The gated MLP of the :func:`can_step` families (llama, qwen3): ``down(act(gate(x)) * up(x))``, its products
    through :func:`linear` (gate and up in one product for an int4 copy,
    :class:`~specert.decoding.quantized.FusedInt4`)."""
    gate, up = mlp.gate_up(x) if hasattr(mlp, "gate_up") else (linear(mlp.gate_proj, x, columns),
                                                                linear(mlp.up_proj, x, columns))
    return linear(mlp.down_proj, mlp.act_fn(gate) * up, columns)


def run_layers(model, x: torch.Tensor, rotate, mask: torch.Tensor | None, store) -> list[torch.Tensor]:
    """The decoder layers of a :func:`can_step` model over ``x [1, n, hidden]`` (the embedded tokens): returns
    transformers' hidden states, the embeddings and each layer's output (the last one normalised).

    ``rotate`` applies the tokens' rotary embedding (:func:`rotary`); ``mask`` ``[1, 1, n, slots]`` (True:
    attended) or None (all); ``store(k, v, i)`` puts layer i's new keys and values ``[1, kv_heads, n, d]`` in a KV
    cache and returns the keys and values the tokens attend to (a ``DynamicCache``'s ``update``, or
    :class:`specert.decoding.static_cache.StaticCache`'s slots).
    """
    n, columns = x.shape[1], layout(model)
    states = [x]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(attn, _rms_norm(layer.input_layernorm, x), rotate, columns)
        k, v = store(k, v, i)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                                             enable_gqa=True)
        x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(1, n, -1), columns)
        x = x + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x), columns)
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
    (:func:`_rms_norm`, :func:`rotary`): at a few microseconds each, operations are what a drafter's token costs
    beside its products."""
    inner, n, past = model.model, len(tokens), cache_length(cache)
    x = inner.embed_tokens(torch.tensor([tokens]))
    where = positions if positions is not None else range(past, past + n)
    rotate = rotary(*inner.rotary_emb(x, torch.tensor([list(where)])))
    if attend is None and n > 1:
        attend = torch.ones(n, past + n, dtype=torch.bool).tril(past)  # causal after the cache
    mask = None if attend is None else attend[None, None]  # True: attended
    states = run_layers(model, x, rotate, mask, cache.update)
    logits = linear(model.lm_head, states[-1], layout(model))[0]
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
