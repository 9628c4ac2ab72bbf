"""A drafter's decoding step compiled by ``torch.compile``, over a KV cache in fixed buffers (as in gpt-fast).

A drafted token of the int4 copy costs about 13 ms eager on 2 cores, of which its integer kernels are 5.4 ms: the
rest is some 30 small operations per layer (norms, rotary embedding, views, residual additions), each a few
microseconds of dispatch. Compiled by inductor, those operations fuse into a few C++ loops, and the same token
costs about 9 ms. It is not bit-identical to the eager copy: inductor fuses the bfloat16 roundings of the
activations differently (logits within 0.45 of the eager copy's over 64 positions of one answer, the same greedy token
at all 64); the verified output is the target's either way.

What compilation needs is inputs whose shapes and strides do not change from step to step, or it compiles again.
A ``DynamicCache`` grows by concatenation and is cropped to the accepted prefix, so its tensors change; here each
layer's keys and values live in one buffer of ``capacity`` slots, written in place (``buffer[:, :, slots] = k``), and
a step attends to the first ``length`` slots through a mask. The number of new tokens, the attended length and the
capacity are marked dynamic, so two graphs (one token; more) serve every step of every prompt: they are compiled
once per process, when the drafter is made (:meth:`StaticCache.warm_up`): for the embedded model's int4 copy 91 s on
2 cores the first time, 15 s when inductor finds them in its disk cache. Prompts (``PREFILL_ROWS`` rows or more, or
anything run on an empty cache) run the same code eagerly: a long prefill is dominated by its matrix products.

Used through the drafter spec ``compiled:SPEC`` (``compiled:int4``, any :class:`~specert.drafters.ModelDrafter`
whose model :func:`~specert.decoding.forward.can_step`).
"""

from __future__ import annotations

import sys

import torch

from specert.decoding.forward import layout, linear, rotary, run_layers
from specert.decoding.quantized import PREFILL_ROWS
from specert.theory.certificates import top1_certificates


def forward_step(model, keys: list[torch.Tensor], values: list[torch.Tensor], ids: torch.Tensor,
                 positions: torch.Tensor,
          slots: torch.Tensor, attend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, V]`` (float32 or float64) of tokens ``ids [n]`` at rotary ``positions [n]``, their keys and
    values written to ``slots [n]`` of every layer's buffers, each token attending to the slots where ``attend [n,
    length]`` is True; and D_q(1) of the last row ``[1]`` (what a certified chain asks next, computed here in the
    same compiled loops as the logits instead of in a dozen eager passes over them afterwards)."""
    x = model.model.embed_tokens(ids[None])
    rotate = rotary(*model.model.rotary_emb(x, positions[None]))
    length = attend.shape[1]

    def store(k, v, i):
        keys[i][:, :, slots] = k
        values[i][:, :, slots] = v
        return keys[i][:, :, :length], values[i][:, :, :length]

    states = run_layers(model, x, rotate, attend[None, None], store)
    logits = linear(model.lm_head, states[-1], layout(model))[0]
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return logits, top1_certificates(logits[-1:])


def compiled_step():
    """:func:`forward_step` compiled by ``torch.compile`` (nothing is compiled until its first call: see
    :meth:`StaticCache.warm_up`)."""
    return torch.compile(forward_step, fullgraph=True)


class StaticCache:
    """The KV cache of one :func:`~specert.decoding.forward.can_step` model in fixed per-layer buffers
    ``[1, kv_heads, capacity, head_dim]``; ``length`` slots hold the context. Runs the model's forward itself
    (:meth:`forward`) since its layout is its own: few tokens through ``step`` (:func:`compiled_step` for a
    compiled drafter, owned by it), prompts through :func:`forward_step` eagerly."""

    def __init__(self, model, capacity: int = 1024, step=forward_step):
        config = model.config
        self.model, self.step = model, step
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = model.model.embed_tokens.weight.dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self.certificate = float("nan")  # D_q(1) of the last row the latest forward returned
        self._allocate(capacity)

    @torch.inference_mode()
    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the buffers with ``capacity`` slots, keeping the ``length`` held."""
        layers = self.model.config.num_hidden_layers
        old = (self.keys, self.values)
        self.keys, self.values = ([torch.zeros(1, self.kv_heads, capacity, self.head_dim, dtype=self.dtype)
                                   for _ in range(layers)] for _ in range(2))
        for new, held in zip((self.keys, self.values), old):
            for buffer, kept in zip(new, held):
                buffer[:, :, : self.length] = kept[:, :, : self.length]
        for buffer in self.keys + self.values:
            torch._dynamo.maybe_mark_dynamic(buffer, 2)  # a larger capacity is the same graph

    def warm_up(self) -> None:
        """Compile the step now, not inside the first timed generation: run it on a few tokens of each count it
        will see (torch.compile specialises a count of 1 and makes larger ones dynamic: two graphs), then empty
        the cache."""
        if sys.stderr.isatty():  # a wait worth announcing on a terminal; logs and pipes stay quiet
            print("specert: compiling the drafter's step (for the embedded model about 90 s on 2 cores the first "
                  "time, 15 s from inductor's disk cache after)", file=sys.stderr, flush=True)
        try:
            for n in (3, 1, 2):
                self.forward([0] * n)
        except Exception as e:  # inductor's many failure types all end here: no compiler, a toolchain error
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"torch.compile could not compile the drafter's step ({type(e).__name__}: {first}); "
                             "it needs a working C++ compiler (g++); drop 'compiled:' from the drafter spec to run "
                             "it eagerly") from None
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def get_seq_length(self) -> int:  # what models.cache_length reads
        return self.length

    @torch.inference_mode()
    def load(self, cache) -> None:
        """Hold what a ``DynamicCache`` holds in its first layers (a drafter made of the target's first layers
        starts from the target's prefill)."""
        self.length = 0
        held = cache.get_seq_length()
        if held > self.capacity:
            self._allocate(2 * held)
        for i, layer in enumerate(cache.layers[: len(self.keys)]):
            self.keys[i][:, :, :held] = layer.keys
            self.values[i][:, :, :held] = layer.values
        self.length = held

    @torch.inference_mode()
    def keep(self, keep_from: int, slots: list[int]) -> None:
        """:func:`specert.decoding.forward.keep_cache` for this layout: keep slots ``< keep_from`` followed by
        ``slots``."""
        end = keep_from + len(slots)
        if slots != list(range(keep_from, end)):
            src = torch.tensor(slots, dtype=torch.long)
            for buffer in self.keys + self.values:
                buffer[:, :, keep_from:end] = buffer[:, :, src]
        self.length = end

    @torch.inference_mode()
    def forward(self, tokens: list[int], positions: list[int] | None = None,
                attend: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`specert.decoding.forward.forward` on this cache: logits ``[len(tokens), V]`` of ``tokens`` run
        after the
        ``length`` slots held (``positions`` and ``attend`` as there), their entries kept in the next slots; D_q(1)
        of the last row in ``certificate``."""
        n, past = len(tokens), self.length
        if past + n > self.capacity:
            self._allocate(2 * (past + n))
        slots = torch.arange(past, past + n)
        # a separate tensor even when equal: torch.compile guards on aliasing, and trees pass their own positions
        where = torch.arange(past, past + n) if positions is None else torch.tensor(positions, dtype=torch.long)
        if attend is None:
            attend = torch.ones(n, past + n, dtype=torch.bool).tril(past)  # causal after the cache
        ids = torch.tensor(tokens, dtype=torch.long)
        if n >= PREFILL_ROWS or not past:  # a prompt (an empty cache would be one more graph: sizes of 1 specialise)
            step = forward_step
        else:
            step = self.step
            for t in (ids, where, slots):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(attend, 0)
            torch._dynamo.maybe_mark_dynamic(attend, 1)
        logits, certificate = step(self.model, self.keys, self.values, ids, where, slots, attend)
        self.length, self.certificate = past + n, float(certificate)
        return logits
