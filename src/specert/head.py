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

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specert.certificates import top1_certificates

FORMAT = "specert-draft-head/1"


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


def fingerprint(model: torch.nn.Module) -> float:
    """A checksum of a model's input embedding: every 97th row summed in float64 (tells targets apart)."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach()[::97].double().sum())


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
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend)  # [B, nh, T, hd]
        x = x + self.o(y.transpose(1, 2).reshape(b, t, h))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up), k, v


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
        last one adds to the normalizer: :func:`~specert.certificates.top1_certificates` of ``small`` with the
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


SHIPPED = {"smollm2-135m": "smollm2-135m.safetensors"}  # target spec -> file in specert/heads


def shipped_file(target, shipped: dict[str, str], what: str, how: str) -> Path:
    """The drafter file in ``specert/heads`` that ``shipped`` (target spec -> file name) names for ``target`` (a
    :class:`~specert.models.LoadedModel`); ``what`` and ``how`` (to train one) word the error for other targets."""
    name = shipped.get(target.name)
    if name is None:
        raise ValueError(f"no {what} ships for target {target.name!r} (only for {', '.join(shipped)}); {how}")
    return Path(__file__).parent / "heads" / name


def shipped_head(target) -> Path:
    """The head shipped in the package for ``target``."""
    return shipped_file(target, SHIPPED, "draft head", "train one with `specert distill` and use head:PATH")


def save_head(head: DraftHead, path) -> Path:
    """Write ``head`` to ``path`` (safetensors: float16 weights, the draft vocabulary, the config as metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in head.state_dict().items()}
    cfg = asdict(head.cfg)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(cfg)})
    tmp.replace(path)
    return path


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
        hint = "; it is a draft head: use head:PATH" if found == FORMAT else ""
        raise ValueError(f"{path} is not a specert {what} (format {found!r}, expected {fmt!r}){hint}")
    return json.loads(meta["config"]), tensors


def check_fingerprint(what: str, trained_for: str, checksum: float, target) -> None:
    """Refuse a drafter trained for another target (its :func:`fingerprint` differs)."""
    mine = fingerprint(target.model)
    if not math.isclose(mine, checksum, rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(f"{what} was trained for another target ({trained_for}; embedding checksum {checksum:.6g}), "
                         f"not {target.name} (checksum {mine:.6g}): train one with `specert distill`")


def load_head(path, target) -> DraftHead:
    """Load a head saved by :func:`save_head` for ``target`` (a :class:`~specert.models.LoadedModel`); refused with
    a clear error if it was trained for another target or vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no draft head file {path}; train one with `specert distill` or use head:default")
    raw, tensors = read_drafter_file(path, FORMAT, "draft head")
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
