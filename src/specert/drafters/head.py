"""A draft head: one transformer layer that drafts from the target's own hidden states (EAGLE-style).

At context position t the target's hidden states ``f_t`` (a few of its layers, concatenated) summarise everything
before and at t; the target's LM head turns the last of them into p(x_{t+1}). The head takes ``f_t`` and the
*next* token's embedding ``e(x_{t+1})`` and predicts x_{t+2}::

    a_t   = W_fuse f_t                                 (depth 1: from the target's hidden states)
    a_t   = g_{t-1}                                    (depth >= 2: the head's own output one position back)
    z_t   = W_in [rmsnorm(a_t); rmsnorm(e(x_{t+1}))]
    g_t   = TransformerLayer(z_0 .. z_t)               (causal attention, its own KV cache)
    q_t   = softmax([W_S rmsnorm(g_t); w_rest . rmsnorm(g_t)])

as in EAGLE (Li et al., 2024, arXiv 2401.15077) with EAGLE-3's fused low/middle/high features and training-time
test (arXiv 2503.01840). It reuses the target's token embedding and LM head (frozen, not stored): ``W_S`` are the LM
head's rows of a *draft vocabulary* S, the most frequent tokens of the training text, as in FR-Spec (arXiv
2502.14856), which makes the head cheap; every token outside S shares one learned logit ``rest``, spread evenly:

    q(i) = softmax(u)_i for i in S,        q(j) = softmax(u)_rest / (V - |S|) for j not in S,

so q is a full distribution over the target's vocabulary (finite KL, certificates) while only |S| + 1 logits are
computed. The head can draft only tokens in S.

A head is stored as one safetensors file (float16 weights, the draft vocabulary and the JSON config with the
target's fingerprint); :func:`load_head` refuses a head trained for another target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention, silu

from specert.decoding.drafts import Drafter, DraftTree, top_tokens, tree_attention
from specert.decoding.schedules import Schedule
from specert.drafters.storage import HEAD_FORMAT, check_fingerprint, read_drafter_file, shipped_file, write_drafter_file
from specert.theory.certificates import top1_certificates


@dataclass(frozen=True)
class HeadConfig:
    hidden: int  # the target's hidden size H
    vocab_size: int  # the target's vocabulary size V
    feature_layers: tuple[int, ...]  # target hidden-state indices fused (0 = embeddings, L = after the final norm)
    heads: int  # attention heads of the head's layer
    intermediate: int  # MLP width of the head's layer
    rope_theta: float = 10000.0
    target: str = ""  # the target's spec, for messages
    target_fingerprint: float = 0.0  # checksum of the target's embedding (see :func:`fingerprint`)
    trained: str = ""  # how it was trained (objective, data, steps), for the record

    @property
    def features(self) -> int:
        return self.hidden * len(self.feature_layers)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, nh, T, hd]`` at ``positions`` ``[T]`` (rotate-half convention)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # [hd/2]
    angles = positions.float()[:, None] * inv[None]  # [T, hd/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [T, hd]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


class HeadLayer(nn.Module):
    """A pre-norm Llama-style decoder layer (attention + SwiGLU MLP) whose keys and values are passed in and out."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h = cfg.hidden
        self.heads, self.theta = cfg.heads, cfg.rope_theta
        self.attn_norm, self.mlp_norm = nn.RMSNorm(h, eps=1e-6), nn.RMSNorm(h, eps=1e-6)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, h, bias=False)

    def forward(self, x, positions, past_k=None, past_v=None, attend=None):
        """x ``[B, T, H]``, positions ``[T]``, past keys/values ``[B, nh, P, hd]``, attend bool ``[T, P + T]``
        (None: everything before and at each query). Returns (output ``[B, T, H]``, keys, values ``[B, nh, T, hd]``)."""
        b, t, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, positions, self.theta), _rope(k, positions, self.theta)  # [B, nh, T, hd]
        keys = k if past_k is None else torch.cat([past_k, k], 2)
        values = v if past_v is None else torch.cat([past_v, v], 2)
        if attend is None and t > 1:
            past = keys.shape[2] - t
            attend = torch.ones(t, past + t, dtype=torch.bool).tril(past)
        y = scaled_dot_product_attention(q, keys, values, attn_mask=attend)  # [B, nh, T, hd]
        x = x + self.o(y.transpose(1, 2).reshape(b, t, h))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(silu(gate) * up), k, v


class DraftHead(nn.Module):
    """The draft head (see the module docstring). ``embed`` ``[V, H]`` and ``lm_head`` ``[V, H]`` are the target's,
    frozen; ``vocab`` ``[S]`` the draft vocabulary."""

    def __init__(self, cfg: HeadConfig, vocab: torch.Tensor, embed: torch.Tensor, lm_head: torch.Tensor):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.fuse = nn.Linear(cfg.features, h, bias=False)
        self.feat_norm, self.tok_norm, self.norm = (nn.RMSNorm(h, eps=1e-6) for _ in range(3))
        self.inp = nn.Linear(2 * h, h, bias=False)
        self.layer = HeadLayer(cfg)
        self.rest = nn.Linear(h, 1)
        self.register_buffer("vocab", vocab.long())
        # NOTE: plain tensors, not parameters or buffers: the target's, shared, never trained nor saved.
        self.embed = embed.detach().float()  # [V, H]
        self.lm_rows = lm_head.detach()[vocab].float()  # [S, H]
        self.log_others = math.log(cfg.vocab_size - len(vocab)) if cfg.vocab_size > len(vocab) else 0.0

    def run(self, a, tokens, positions, past_k=None, past_v=None, attend=None):
        """The layer over inputs ``a`` ``[B, T, H]`` (fused features or earlier outputs) and next tokens
        ``[B, T]``; returns (g ``[B, T, H]``, keys, values)."""
        z = self.inp(torch.cat([self.feat_norm(a), self.tok_norm(self.embed[tokens])], -1))
        return self.layer(z, positions, past_k, past_v, attend)

    def draft_logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary and the shared rest: ``[..., S + 1]``."""
        h = self.norm(g)
        return torch.cat([h @ self.lm_rows.T, self.rest(h)], -1)

    def certificate(self, small: torch.Tensor) -> float | None:
        """D_q(1) of the drafter's distribution over the whole vocabulary (:meth:`full_logits` of ``small``
        ``[S + 1]``) from the small logits alone: 8,193 logits scanned instead of 49,152 (0.3 ms of a 36 ms step).
        The rest's M tokens each have the logit r = small[-1] - log M; when two draft logits exceed it, q's two most
        probable tokens are draft tokens, and the rest's mass M e^r = e^{small[-1]} is what the small logits'
        last one adds to the normalizer: :func:`~specert.theory.certificates.top1_certificates` of ``small`` with the
        draft logits as the only candidates is that of the full logits. None otherwise (a rest token among the two
        most probable: the caller computes it over the whole vocabulary)."""
        logits = small.detach().numpy()  # (numpy: a comparison and a count, not three torch ops of dispatch)
        if self.cfg.vocab_size == len(self.vocab) or (logits[:-1] > logits[-1] - self.log_others).sum() < 2:
            return None
        return float(top1_certificates(small[None], candidates=len(self.vocab)))

    def full_logits(self, small: torch.Tensor) -> torch.Tensor:
        """``[..., S + 1]`` draft logits as logits over the whole vocabulary ``[..., V]`` (the rest spread evenly)."""
        out = (small[..., -1:] - self.log_others).expand(*small.shape[:-1], self.cfg.vocab_size).clone()
        out[..., self.vocab] = small[..., :-1]
        return out


def shipped_head(target) -> Path:
    """The head shipped in the package for ``target``."""
    return shipped_file(target, HEAD_FORMAT, "draft head", "train one with `specert distill` and use head:PATH")


def save_head(head: DraftHead, path) -> Path:
    """Write ``head`` to ``path`` (safetensors: float16 weights, the draft vocabulary, the config as metadata)."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in head.state_dict().items()}
    return write_drafter_file(path, tensors, HEAD_FORMAT, asdict(head.cfg))


def load_head(path, target) -> DraftHead:
    """Load a head saved by :func:`save_head` for ``target`` (a :class:`~specert.decoding.models.LoadedModel`);
    refused with
    a clear error if it was trained for another target or vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no draft head file {path}; train one with `specert distill` or use head:default")
    raw, tensors = read_drafter_file(path, HEAD_FORMAT, "draft head")
    cfg = HeadConfig(**{**raw, "feature_layers": tuple(raw["feature_layers"])})
    model = target.model
    if cfg.vocab_size != target.vocab_size or cfg.hidden != model.config.hidden_size:
        raise ValueError(
            f"draft head {path.name} was trained for a target with {cfg.vocab_size} tokens and hidden size "
            f"{cfg.hidden} ({cfg.target}), but {target.name} has {target.vocab_size} and {model.config.hidden_size}"
        )
    check_fingerprint(f"draft head {path.name}", cfg.target, cfg.target_fingerprint, target)
    layers = model.config.num_hidden_layers
    if max(cfg.feature_layers) > layers:
        raise ValueError(f"draft head {path.name} reads layer {max(cfg.feature_layers)}; {target.name} has {layers}")
    head = DraftHead(cfg, tensors["vocab"], model.get_input_embeddings().weight,
                     model.get_output_embeddings().weight)
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return head.eval()


class HeadDrafter(Drafter):
    """A draft head (:mod:`specert.drafters.head`) over the target's hidden states, with its own one-layer KV cache.

    Invariant: ``features`` mirrors the target's KV cache, the context but its last token. Head entry t pairs
    ``features[t]`` with token t+1 and predicts token t+2, so with n states the last entry (n-1) predicts the
    token after the context: the root's children. Tree nodes are entries n, n+1, ... (their input is their
    parent's output g), dropped after each proposal; entries of the context are kept while their state and
    token are unchanged.
    """

    def __init__(self, head, spec: str):
        self.head, self.spec = head, spec
        self.feature_layers = head.cfg.feature_layers
        self._buffer = torch.zeros(0, head.cfg.features)  # grows by doubling; ``features`` is a view of its start
        self.features = self._buffer  # [n, nl * H]
        self.keys = self.values = None  # [1, nh, C, hd]
        self.entry_tokens: list[int] = []  # token t+1 of each cached entry t

    @torch.inference_mode()
    def target_ran(self, start, features):
        # NOTE: rounded to float16 as in training, where the target's states were cached in float16.
        new = self.features[:0] if features is None else features.half().float()
        end = start + len(new)
        if end > len(self._buffer):  # a preallocated buffer: no copy of the whole history at every step
            grown = torch.zeros(max(end, 2 * len(self._buffer)), self._buffer.shape[1])
            grown[:start] = self._buffer[:start]
            self._buffer = grown
        self._buffer[start:end] = new
        self.features = self._buffer[:end]
        self.entry_tokens = self.entry_tokens[:start]

    def _crop(self, n: int) -> None:
        self.entry_tokens = self.entry_tokens[:n]
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]

    @torch.inference_mode()
    def propose(self, context: list[int], schedule: Schedule) -> DraftTree:
        n = len(self.features)
        assert n == len(context) - 1, "the decoder must pass the target's states of every cached token"
        if n == 0:
            return DraftTree([], [], None, [False])
        same = 0
        while same < len(self.entry_tokens) and self.entry_tokens[same] == context[same + 1]:
            same += 1
        same = min(same, n - 1)  # always re-run at least the last entry: its output drafts the root's children
        self._crop(same)
        head = self.head
        a = head.fuse(self.features[same:n])[None]  # [1, n - same, H]: new context entries, in one causal pass
        g, k, v = head.run(a, torch.tensor([context[same + 1 : n + 1]]), torch.arange(same, n), self.keys, self.values)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        self.values = v if self.values is None else torch.cat([self.values, v], 2)
        self.entry_tokens = list(context[1 : n + 1])
        root_g = g[0, -1]
        small = {-1: head.draft_logits(root_g)}  # [S + 1] per expanded position
        outputs = {-1: root_g}
        tokens, parents = [], []
        frontier = [-1]
        for depth in range(schedule.depths):
            q = head.full_logits(torch.stack([small[p] for p in frontier]))  # [Fr, V]
            certificate = head.certificate(small[frontier[0]]) if schedule.certifies and len(frontier) == 1 \
                else None  # 0.12 ms
            widths = schedule.widths(depth, q, len(frontier), schedule.budget - len(tokens), certificate)
            level_start = len(tokens)
            for pos, width in zip(frontier, widths):
                if width:
                    tokens += head.vocab[top_tokens(small[pos][:-1], width)].tolist()
                    parents += [pos] * width
            frontier = list(range(level_start, len(tokens)))
            if not frontier or depth == schedule.depths - 1 or not schedule.may_extend(depth + 1):
                break
            attend = tree_attention(parents, frontier, n)  # [L, n + level end]: node i at entry n + i
            a = torch.stack([outputs[parents[i]] for i in frontier])[None]  # [1, L, H]
            g, k, v = head.run(a, torch.tensor([[tokens[i] for i in frontier]]), torch.full((len(frontier),),
                               n + depth), self.keys, self.values, attend)
            self.keys, self.values = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
            for j, i in enumerate(frontier):
                outputs[i], small[i] = g[0, j], head.draft_logits(g[0, j])
        self._crop(n)
        rows = [-1] + list(range(len(tokens)))
        expanded = [r in small for r in rows]
        logits = torch.full((len(rows), head.cfg.vocab_size), float("nan"))
        scored = [r for r in rows if r in small]
        logits[[r + 1 for r in scored]] = head.full_logits(torch.stack([small[r] for r in scored]))
        return DraftTree(tokens, parents, logits, expanded)

    @torch.inference_mode()
    def score(self, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
        """Teacher-forced drafter logits ``[T, V]`` along ``tokens`` with the target's states ``[T, nl * H]``: row t
        predicts token t+1 (row 0, with no state before it, is NaN)."""
        head = self.head
        g, _, _ = head.run(head.fuse(features[:-1].half().float())[None], torch.tensor([tokens[1:]]),
                           torch.arange(len(tokens) - 1))
        nan = torch.full((1, head.cfg.vocab_size), float("nan"))
        return torch.cat([nan, head.full_logits(head.draft_logits(g[0]))])
