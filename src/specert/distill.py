"""`specert distill`: train a drafter for a target, with a certificate-aware objective.

Two architectures: a draft head over the target's hidden states (:mod:`specert.head`, ``architecture="head"``) or
the target itself with its least useful layers removed and healed (:mod:`specert.pruned`, ``"pruned"``). Both
learn from the same cache.

Three phases in a work folder, each resumable after an interruption (parts and checkpoints are written whole,
atomically, or not at all):

1. ``meta.json``: the sample of training text (deterministic), its tokenization, the draft vocabulary (the most
   frequent tokens) and the held-out split. With ``answers="target"`` (self-distillation, as Medusa-2 recommends
   when the data's answers are not the target's) each text is the conversation's first user turn followed by the
   target's own greedy answer, generated in batches into ``answers/part-NNNNN.json`` first. (Measured on the
   embedded model it did not raise agreement on the target's own answers; see the README.)
2. ``cache/part-NNNNN.pt``: the target run once, teacher-forced, over every text: per position its hidden states at
   the fused layers (float16), and from the full distribution p (computed from those float16 states, so training sees
   exactly the same p): log-normaliser, log-mass outside the draft vocabulary, the outside part of sum p log p, the
   certificate of the served rule and the greedy token.
3. ``<objective>/checkpoint.pt`` (``pruned-<objective>/`` for the pruned architecture) every few steps, then the
   drafter's file. A head trains with EAGLE-3's *training-time test* (it also learns from its own outputs,
   ``depths`` positions deep); the pruned model drafts from its own KV cache like the target and trains on the texts
   teacher-forced, over the full vocabulary.

The objective per position, with C_p the certificate of the rule the drafter will serve (THEORY.md section 3)::

    kl:         KL(p || q)
    certified:  KL(p || q) + lambda * max(0, KL(p || q) - C_p)
    reachable:  KL(p || q) + lambda * sigmoid(log(KL(p || q) / C_p) / tau),   tau = 0.5

The hinge's gradient on an uncertified step is lambda times the KL gradient, whatever the distance to C_p: it
reweights every uncertified step alike, most of which no small head can certify. The ``reachable`` term is a
smooth count of uncertified steps: its gradient, (lambda / tau) s (1 - s) / KL times the KL gradient, peaks on
steps whose KL is within a factor e^tau of C_p and vanishes on steps far above it (or far below).

KL(p || q) over the full vocabulary is exact, though q is computed on the draft vocabulary S only: with
q(j) = q_rest / (V - |S|) outside S,

    KL = sum_{i in S} p_i log(p_i / q_i) + sum_{j not in S} p_j log p_j - p_rest log(q_rest / (V - |S|)).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specert.certificates import certificate
from specert.head import DraftHead, HeadConfig, fingerprint, save_head
from specert.models import EMBEDDED, LoadedModel, batched_greedy, encode_prompt, load_model
from specert.prompts import SHAREGPT, training_chats
from specert.rules import rule

OBJECTIVES = ("kl", "certified", "reachable")
ARCHITECTURES = ("head", "pruned")
DEFAULT_STEPS = {"head": 1000, "pruned": 150}  # what fits the hour on 2 cores with the cache (README)
REACHABLE_TAU = 0.5  # width, in log(KL / C_p), of the band the reachable objective works on
ANSWERS = ("data", "target")
GENERATION_BATCH = 32  # prompts answered at once in self-distillation (fixed: it is part of what the answers are)


@dataclass
class DistillConfig:
    target: str = EMBEDDED
    data: str = SHAREGPT
    answers: str = "data"  # "data": the texts as given; "target": the target's own greedy answers to them
    texts: int = 1000  # training texts (conversations) sampled from data
    held_out: int = 48  # further texts kept aside for evaluation
    max_tokens: int = 384  # each text's first tokens
    draft_vocab: int = 8192  # |S|
    feature_layers: tuple[int, ...] = ()  # target hidden-state indices (default: ~L/10, L/2 and L, the final one)
    rule: str = "greedy"  # the rule whose certificate the objective targets
    objective: str = "certified"
    architecture: str = "head"
    drop: int = 4  # pruned: decoder layers removed
    rank: int = 16  # pruned: LoRA rank
    hinge: float = 1.0  # lambda, the weight of the certificate term
    depths: int = 3  # training-time test depth
    steps: int | None = None  # default: DEFAULT_STEPS of the architecture
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    save_every: int = 50

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.architecture]
        if self.rank < 1 or self.drop < 1:
            raise ValueError(f"rank and drop must be >= 1, got {self.rank} and {self.drop}")
        for name in ("texts", "held_out", "max_tokens", "draft_vocab", "depths", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 8:
            raise ValueError(f"max-tokens must be >= 8, got {self.max_tokens}")
        if self.answers not in ANSWERS:
            raise ValueError(f"answers must be one of {', '.join(ANSWERS)}, got {self.answers!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.lr > 0 or self.hinge < 0:
            raise ValueError("lr must be > 0 and hinge >= 0")
        self.rule = str(rule(self.rule))

    def cache_key(self) -> dict:
        """What the cache depends on (training options may change between runs of the same work folder)."""
        keys = ("target", "data", "answers", "texts", "held_out", "max_tokens", "draft_vocab", "feature_layers",
                "rule", "seed")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def default_feature_layers(layers: int) -> tuple[int, ...]:
    """Low, middle and final hidden states (EAGLE-3); index L is the final, normalised one the LM head reads."""
    return tuple(sorted({max(1, layers // 10), layers // 2, layers}))


def encode_text(loaded: LoadedModel, item, max_tokens: int) -> list[int]:
    """Token ids of a training text (a chat through the chat template, or a plain string), cut to max_tokens."""
    tok = loaded.tokenizer
    if isinstance(item, str) or not getattr(tok, "chat_template", None):
        text = item if isinstance(item, str) else "\n".join(m["content"] for m in item)
        ids = tok(text)["input_ids"]
    else:
        ids = tok.apply_chat_template(item, return_dict=True)["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [int(i) for i in ids][:max_tokens]


def prompt_of(loaded: LoadedModel, item, limit: int) -> list[int] | None:
    """What the target answers in self-distillation: a chat's messages up to its first user turn through the chat
    template (with the generation prompt), or a plain text's first half. None when longer than ``limit`` tokens."""
    if isinstance(item, str):
        ids = encode_text(loaded, item, 2 * limit)
        ids = ids[: max(1, len(ids) // 2)]
    else:
        first = next((i for i, m in enumerate(item) if m["role"] == "user"), None)
        if first is None or sum(len(m["content"]) for m in item[: first + 1]) > 16 * limit:  # surely too long
            return None
        ids = encode_prompt(loaded, item[: first + 1])
    return ids if 0 < len(ids) <= limit else None


def target_answers(cfg: DistillConfig, loaded: LoadedModel, work: Path, progress: bool = True) -> list[list[int]]:
    """Self-distillation texts: prompt + the target's greedy answer (up to and including its EOS token), at most
    ``max_tokens`` each, for ``held_out + texts`` prompts of at most ``max_tokens // 2`` tokens. Generated
    :data:`GENERATION_BATCH` prompts at a time (similar lengths together) into ``answers/``, resumable."""
    limit, want = cfg.max_tokens // 2, cfg.held_out + cfg.texts
    prompts = []
    for item in training_chats(cfg.data, None, cfg.seed, shuffle=True):
        if (ids := prompt_of(loaded, item, limit)) is not None:
            prompts.append(ids)
            if len(prompts) == want:
                break
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i : i + GENERATION_BATCH] for i in range(0, len(order), GENERATION_BATCH)]
    folder = work / "answers"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in range(len(chunks)) if not (folder / f"part-{c:05d}.json").is_file()]
    bar = tqdm(total=sum(cfg.max_tokens - len(prompts[i]) for c in todo for i in chunks[c]),
               desc="generating the target's answers", unit="tok", disable=not progress or not todo)
    eos = loaded.eos_token_ids
    for c in todo:
        rows = [prompts[i] for i in chunks[c]]
        steps = cfg.max_tokens - min(map(len, rows))
        answers: list[list[int]] = [[] for _ in rows]
        for _, _, tokens, alive in batched_greedy(loaded.model, rows, steps, eos):
            for r, (t, a) in enumerate(zip(tokens.tolist(), alive.tolist())):
                if a and len(rows[r]) + len(answers[r]) < cfg.max_tokens:
                    answers[r].append(t)
                    bar.update(1)
        bar.update(sum(cfg.max_tokens - len(p) - len(a) for p, a in zip(rows, answers)))  # ended early
        tmp = folder / f".part-{c:05d}.json.tmp"
        tmp.write_text(json.dumps({"index": chunks[c], "answers": answers}))
        os.replace(tmp, folder / f"part-{c:05d}.json")
    bar.close()
    seqs = [[] for _ in prompts]
    for c in range(len(chunks)):
        part = json.loads((folder / f"part-{c:05d}.json").read_text())
        for i, answer in zip(part["index"], part["answers"]):
            seqs[i] = prompts[i] + answer
    return seqs


def prepare(cfg: DistillConfig, loaded: LoadedModel, work: Path, progress: bool = True) -> dict:
    """Phase 1: sample and tokenize the texts, choose the draft vocabulary; ``meta.json`` (reused when present)."""
    path = work / "meta.json"
    if path.is_file():
        meta = json.loads(path.read_text())
        meta["config"].setdefault("answers", "data")  # folders written before self-distillation existed
        if meta["config"] != cfg.cache_key():
            diff = [k for k in cfg.cache_key() if meta["config"].get(k) != cfg.cache_key()[k]]
            raise ValueError(f"{work} holds a cache built with other options ({', '.join(diff)}); "
                             "use another work folder or the same options")
        return meta
    if loaded.tokenizer is None:
        raise ValueError(f"target {loaded.name!r} has no tokenizer: distillation needs text")
    if cfg.answers == "target":
        seqs = target_answers(cfg, loaded, work, progress)
    else:
        seqs = [encode_text(loaded, it, cfg.max_tokens) for it in training_chats(cfg.data, cfg.texts + cfg.held_out,
                                                                                 cfg.seed)]
    if len(seqs) < cfg.held_out + 1:
        raise ValueError(f"{cfg.data} has {len(seqs)} usable texts; need more than held-out ({cfg.held_out})")
    held, train = seqs[: cfg.held_out], [s for s in seqs[cfg.held_out :] if len(s) >= 8]
    counts = Counter(t for s in train for t in s)
    size = min(cfg.draft_vocab, loaded.vocab_size)
    vocab = sorted(t for t, _ in counts.most_common(size))
    meta = {"config": cfg.cache_key(), "train": train, "held_out": [s for s in held if len(s) >= 8], "vocab": vocab,
            "train_tokens": sum(map(len, train)), "fingerprint": fingerprint(loaded.model)}
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".meta.json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)
    return meta


@torch.inference_mode()
def target_outputs(loaded: LoadedModel, seqs: list[list[int]], layers: tuple[int, ...], vocab: torch.Tensor,
                   served) -> dict:
    """The target run teacher-forced over ``seqs`` (one batch): what training needs per position (see the module
    docstring), concatenated over sequences, with ``lengths``."""
    model = loaded.model
    b, width = len(seqs), max(map(len, seqs))
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    states = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    feats = torch.cat([states[i] for i in layers], -1).half()  # [B, T, nl * H]
    lm = model.get_output_embeddings().weight  # [V, H]
    h = lm.shape[1]
    out = {k: [] for k in ("features", "tokens", "lse", "log_rest", "rest_plogp", "certificate", "top1")}
    for i, s in enumerate(seqs):
        n = len(s)
        logits = feats[i, :n, -h:].float() @ lm.T  # [T, V]: p from the float16 states training will see
        lse = torch.logsumexp(logits, -1)  # [T]
        logp = logits - lse[:, None]
        logp_s = logp[:, vocab].double()  # [T, S]
        p_rest = (1 - logp_s.exp().sum(-1)).clamp(min=0)
        out["features"].append(feats[i, :n])
        out["tokens"].append(torch.tensor(s, dtype=torch.int32))
        out["lse"].append(lse)
        out["log_rest"].append(p_rest.log().float())
        plogp = (logp.exp() * logp).sum(-1).double()  # sum_V p log p (logits of a matmul are finite)
        out["rest_plogp"].append((plogp - (logp_s.exp() * logp_s).sum(-1)).clamp(max=0).float())
        out["certificate"].append(certificate(logits, served).float())
        out["top1"].append(logits.argmax(-1).int())
    cat = {k: torch.cat(v) for k, v in out.items()}
    cat["lengths"] = torch.tensor([len(s) for s in seqs])
    return cat


def build_cache(cfg: DistillConfig, loaded: LoadedModel, meta: dict, work: Path, progress: bool = True,
                batch: int = 8) -> None:
    """Phase 2: the target's outputs for every text, in parts (held-out first); existing parts are kept."""
    layers = tuple(cfg.feature_layers)
    vocab = torch.tensor(meta["vocab"])
    served = rule(cfg.rule)
    seqs = meta["held_out"] + meta["train"]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    (work / "cache").mkdir(parents=True, exist_ok=True)
    todo = [c for c in range(len(chunks)) if not (work / "cache" / f"part-{c:05d}.pt").is_file()]
    bar = tqdm(total=sum(len(seqs[i]) for c in todo for i in chunks[c]), desc="caching target outputs",
               unit="tok", disable=not progress or not todo)
    for c in todo:
        part = target_outputs(loaded, [seqs[i] for i in chunks[c]], layers, vocab, served)
        part["index"] = torch.tensor(chunks[c])  # position of each text in held_out + train
        _atomic_save(part, work / "cache" / f"part-{c:05d}.pt")
        bar.update(int(part["lengths"].sum()))
    bar.close()


@dataclass
class Texts:
    """Cached target outputs of a set of texts, one tensor per field, indexed by text through ``offsets``."""

    fields: dict
    offsets: list[int]
    lengths: list[int]

    def batch(self, which: list[int]) -> dict:
        """Right-padded ``[B, T, ...]`` tensors of the given texts and ``valid`` ``[B, T]``."""
        width = max(self.lengths[i] for i in which)
        out = {}
        for name, t in self.fields.items():
            pad = torch.zeros((len(which), width) + t.shape[1:], dtype=t.dtype)
            for row, i in enumerate(which):
                pad[row, : self.lengths[i]] = t[self.offsets[i] : self.offsets[i] + self.lengths[i]]
            out[name] = pad
        valid = torch.zeros(len(which), width, dtype=torch.bool)
        for row, i in enumerate(which):
            valid[row, : self.lengths[i]] = True
        out["valid"] = valid
        return out


def load_cache(meta: dict, work: Path) -> tuple[Texts, Texts]:
    """(train, held-out) cached outputs."""
    parts = [torch.load(p, weights_only=True) for p in sorted((work / "cache").glob("part-*.pt"))]
    n_held = len(meta["held_out"])
    total = n_held + len(meta["train"])
    got = sum(len(p["index"]) for p in parts)
    if got != total:
        raise ValueError(f"the cache in {work} holds {got} of {total} texts; run distill again to finish it")
    names = [k for k in parts[0] if k not in ("lengths", "index")]
    split: list[dict] = [{"fields": {k: [] for k in names}, "lengths": []} for _ in range(2)]
    for p in sorted(parts, key=lambda p: int(p["index"][0])):
        start = 0
        for idx, length in zip(p["index"].tolist(), p["lengths"].tolist()):
            s = split[0 if idx >= n_held else 1]
            for k in names:
                s["fields"][k].append(p[k][start : start + length])
            s["lengths"].append(length)
            start += length
    out = []
    for s in split:
        offsets = [0]
        for n in s["lengths"][:-1]:
            offsets.append(offsets[-1] + n)
        out.append(Texts({k: torch.cat(v) for k, v in s["fields"].items()}, offsets, s["lengths"]))
    return out[0], out[1]


def _depth_mask(t: int, depth: int) -> torch.Tensor:
    """Training-time test attention ``[T, depth * T]`` for pass ``depth`` (1-based): the query at t sees pass 1's
    keys at s <= t - depth + 1 (the real context) and pass j's key at t - depth + j (its own drafted ancestors)."""
    q = torch.arange(t)[:, None]
    s = torch.arange(t)[None]
    blocks = [s <= q - depth + 1] + [s == q - depth + j for j in range(2, depth + 1)]
    return torch.cat(blocks, 1)


def unrolled(head: DraftHead, feats: torch.Tensor, tokens: torch.Tensor, depths: int):
    """Training-time test: yield the head's outputs g ``[B, T-1, H]`` for depth 1, 2, ..., ``depths``.

    Depth 1 reads the target's states ``feats`` ``[B, T, nl * H]``; depth d reads depth d-1's output one position
    back, and its query at t attends as a drafted token d positions deep does at decoding (:func:`_depth_mask`).
    """
    t = feats.shape[1] - 1
    positions, nxt = torch.arange(t), tokens[:, 1:]
    keys, values, prev = [], [], None
    for d in range(1, depths + 1):
        if d == 1:
            g, k, v = head.run(head.fuse(feats[:, :-1]), nxt, positions)
        else:
            a = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)  # [B, T-1, H]
            g, k, v = head.run(a, nxt, positions, torch.cat(keys, 2), torch.cat(values, 2), _depth_mask(t, d))
        keys.append(k)
        values.append(v)
        prev = g
        yield g


def objective(kl: torch.Tensor, cert: torch.Tensor, m: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """The training objective (module docstring) averaged over the entries ``m`` of per-entry ``kl`` and C_p."""
    loss = kl[m].mean()
    if cfg.objective == "certified":
        loss = loss + cfg.hinge * F.relu(kl - cert)[m].mean()
    elif cfg.objective == "reachable":
        ratio = kl.clamp(min=1e-12).log() - cert.clamp(min=1e-12).log()
        loss = loss + cfg.hinge * torch.sigmoid(ratio / REACHABLE_TAU)[m].mean()
    return loss


def student_losses(model: torch.nn.Module, batch: dict, cfg: DistillConfig) -> dict:
    """:func:`losses` for a standalone drafter (the pruned model), which reads the same tokens as the target: entry
    t's q is the drafter's next-token distribution after tokens 0..t, over the full vocabulary, and p the target's
    (from its cached float16 final states, as the head's). Depth 1 only (a standalone drafter's deeper drafts are
    the same computation on its own tokens)."""
    tokens, valid = batch["tokens"].long(), batch["valid"]
    lm = model.get_output_embeddings().weight
    h = lm.shape[1]
    with torch.no_grad():
        logp = batch["features"][..., -h:].float() @ lm.T.float() - batch["lse"][..., None]  # [B, T, V]
        p = logp.exp()
        neg_entropy = (p * logp).sum(-1)
        top1 = batch["top1"].long()
    logits = model(input_ids=tokens, attention_mask=valid.long(), use_cache=False).logits
    logq = F.log_softmax(logits.float(), -1)
    kl = neg_entropy - (p * logq).sum(-1)  # [B, T]
    out = {"loss": objective(kl, batch["certificate"], valid, cfg)}
    with torch.no_grad():
        out["kl/1"] = float(kl[valid].mean())
        out["agree/1"] = float((logq.argmax(-1) == top1)[valid].float().mean())
        out["certified/1"] = float((kl < batch["certificate"])[valid].float().mean())
        out["kl_entries"] = kl[valid].detach()
        out["count/1"] = int(valid.sum())
    return out


def losses(head: DraftHead, batch: dict, cfg: DistillConfig) -> dict:
    """The objective and its parts for one batch (see the module docstring), over ``cfg.depths`` passes.

    Entry t of a text pairs the target's states at t with token t+1 and predicts token t+2, whose target
    distribution p is the target's at t+1. Returns scalars ``loss`` and per depth ``kl/d``, ``agree/d``,
    ``certified/d``, and the per-entry KL of depth 1 under ``kl_entries`` (for medians).
    """
    feats = batch["features"].float()  # [B, T, nl * H]
    tokens = batch["tokens"].long()  # [B, T]
    h = head.cfg.hidden
    t = feats.shape[1] - 1  # entries
    with torch.no_grad():  # the target's distribution at t+1 over S, the rest, and -H(p)
        logp_s = feats[:, 1:, -h:] @ head.lm_rows.T - batch["lse"][:, 1:, None]  # [B, t, S]
        p_s = logp_s.exp()
        p_rest = batch["log_rest"][:, 1:].exp()  # [B, t]
        neg_entropy = (p_s * logp_s).sum(-1) + batch["rest_plogp"][:, 1:]
        cert = batch["certificate"][:, 1:]
        top1 = batch["top1"][:, 1:].long()
    valid = batch["valid"][:, 1:]
    positions = torch.arange(t)
    out, total = {}, 0.0
    for d, g in enumerate(unrolled(head, feats, tokens, cfg.depths), 1):
        logq = F.log_softmax(head.draft_logits(g), -1)  # [B, t, S + 1]
        cross = -((p_s * logq[..., :-1]).sum(-1) + p_rest * (logq[..., -1] - head.log_others))
        kl = neg_entropy + cross  # [B, t]
        m = valid & (positions >= d - 1)
        total = total + objective(kl, cert, m, cfg) / cfg.depths
        with torch.no_grad():
            agree = head.vocab[logq[..., :-1].argmax(-1)] == top1
            out[f"kl/{d}"] = float(kl[m].mean())
            out[f"agree/{d}"] = float(agree[m].float().mean())
            out[f"certified/{d}"] = float((kl < cert)[m].float().mean())
            out[f"count/{d}"] = int(m.sum())
            if d == 1:
                out["kl_entries"] = kl[m].detach()
    out["loss"] = total
    return out


def new_head(cfg: DistillConfig, loaded: LoadedModel, vocab: list[int], seed: int) -> DraftHead:
    model = loaded.model
    mc = model.config
    data = f"the target's answers to {cfg.data}" if cfg.answers == "target" else cfg.data
    rope = getattr(mc, "rope_parameters", None) or {}
    hc = HeadConfig(hidden=mc.hidden_size, vocab_size=loaded.vocab_size, feature_layers=tuple(cfg.feature_layers),
                    heads=max(1, mc.hidden_size // 64) if mc.hidden_size % 64 == 0 else mc.num_attention_heads,
                    intermediate=mc.intermediate_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
                    target=loaded.name, target_fingerprint=fingerprint(model),
                    trained=f"{cfg.objective} on {data}, {cfg.steps} steps of {cfg.batch_size}, seed {cfg.seed}")
    torch.manual_seed(seed)
    return DraftHead(hc, torch.tensor(vocab), model.get_input_embeddings().weight,
                     model.get_output_embeddings().weight)


def _lr(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_folder(cfg: DistillConfig, work: Path) -> Path:
    """Where a training run keeps its checkpoint and report: ``<objective>`` (head) or ``pruned-<objective>``."""
    return work / (cfg.objective if cfg.architecture == "head" else f"{cfg.architecture}-{cfg.objective}")


def pruned_layers(cfg: DistillConfig, loaded: LoadedModel, meta: dict, folder: Path, texts: int = 16) -> dict:
    """The layers the pruned drafter keeps, from the block influence on the first ``texts`` training texts
    (:mod:`specert.pruned`); measured once per run folder (``layers.json``)."""
    from specert.pruned import block_influence, layers_to_keep

    path = folder / "layers.json"
    if path.is_file():
        chosen = json.loads(path.read_text())
        if chosen["drop"] == cfg.drop:
            return chosen
    influence = block_influence(loaded.model, meta["train"][:texts])
    chosen = {"drop": cfg.drop, "keep": list(layers_to_keep(influence, cfg.drop)),
              "block_influence": [round(float(b), 5) for b in influence]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".layers.json.tmp"
    tmp.write_text(json.dumps(chosen))
    os.replace(tmp, path)
    return chosen


def new_student(cfg: DistillConfig, loaded: LoadedModel, meta: dict, folder: Path):
    """(untrained drafter, its losses function) for ``cfg.architecture``."""
    if cfg.architecture == "head":
        return new_head(cfg, loaded, meta["vocab"], cfg.seed), losses
    from specert.pruned import student

    keep = pruned_layers(cfg, loaded, meta, folder)["keep"]
    torch.manual_seed(cfg.seed)
    return student(loaded.model, tuple(keep), cfg.rank), student_losses


def train(cfg: DistillConfig, loaded: LoadedModel, meta: dict, train_texts: Texts, work: Path,
          progress: bool = True) -> torch.nn.Module:
    """Phase 3: train the drafter; resumes from ``<run folder>/checkpoint.pt`` (its trained parameters and the
    optimiser). Batches depend only on the seed and the step, so a resumed run sees the same batches as an
    uninterrupted one."""
    folder = run_folder(cfg, work)
    folder.mkdir(parents=True, exist_ok=True)
    model, loss_fn = new_student(cfg, loaded, meta, folder)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt, start = folder / "checkpoint.pt", 0
    key = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    key["feature_layers"] = list(key["feature_layers"])
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != key:
            raise ValueError(f"{ckpt} was written with other training options; remove it or use another work folder")
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(state["trained"][name])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    n = len(train_texts.lengths)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
               desc=f"training ({cfg.architecture}, {cfg.objective})", unit="step",
               disable=not progress or start >= cfg.steps)
    model.train()
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        which = torch.randint(n, (min(cfg.batch_size, n),), generator=g).tolist()
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        parts = loss_fn(model, train_texts.batch(which), cfg)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(kl=f"{parts['kl/1']:.2f}", agree=f"{parts['agree/1']:.2f}",
                        certified=f"{parts['certified/1']:.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            trained = {name: p.detach().clone() for name, p in zip(names, params)}
            _atomic_save({"config": key, "step": step + 1, "trained": trained, "optimizer": opt.state_dict()}, ckpt)
    return model.eval()


@torch.no_grad()
def held_out_report(model: torch.nn.Module, texts: Texts, cfg: DistillConfig, batch: int = 8) -> dict:
    """Teacher-forced figures on held-out texts: per depth (a head's; a pruned drafter has depth 1) mean KL,
    agreement with the target's greedy token and the certified fraction; and at depth 1 the median KL."""
    loss_fn = losses if isinstance(model, DraftHead) else student_losses
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    kls = []
    for i in range(0, len(texts.lengths), batch):
        which = list(range(i, min(i + batch, len(texts.lengths))))
        parts = loss_fn(model, texts.batch(which), cfg)
        for key in [k for k in parts if k.startswith("count/")]:
            d = key.split("/")[1]
            for name in ("kl", "agree", "certified"):
                sums[f"{name}/{d}"] = sums.get(f"{name}/{d}", 0.0) + parts[f"{name}/{d}"] * parts[key]
                weights[f"{name}/{d}"] = weights.get(f"{name}/{d}", 0) + parts[key]
        kls.append(parts["kl_entries"])
    report = {k: sums[k] / weights[k] for k in sums}
    report["median_kl/1"] = float(torch.cat(kls).median())
    report["positions"] = weights["kl/1"]
    return report


def run_distill(cfg: DistillConfig, work: Path, out: Path, progress: bool = True) -> dict:
    """All three phases; writes the drafter to ``out`` and ``report.json`` to its run folder. Returns the report."""
    cfg.validate()
    loaded = load_model(cfg.target)
    layers = loaded.model.config.num_hidden_layers
    if not cfg.feature_layers:
        cfg.feature_layers = default_feature_layers(layers)
    cfg.feature_layers = tuple(int(i) for i in cfg.feature_layers)
    if cfg.feature_layers[-1] != layers or min(cfg.feature_layers) < 0:
        raise ValueError(f"feature layers must lie in 0..{layers} and end with {layers} (the final states), "
                         f"got {list(cfg.feature_layers)}")
    work = Path(work)
    meta = prepare(cfg, loaded, work, progress)
    build_cache(cfg, loaded, meta, work, progress)
    train_texts, held = load_cache(meta, work)
    model = train(cfg, loaded, meta, train_texts, work, progress)
    folder = run_folder(cfg, work)
    extra = {}
    if cfg.architecture == "head":
        from specert.head import load_head

        save_head(model, out)
        saved = load_head(out, loaded)  # figures of the head as stored (float16 weights)
    else:
        from specert.pruned import PrunedConfig, load_pruned, save_pruned

        chosen = pruned_layers(cfg, loaded, meta, folder)
        mc = loaded.model.config
        data = f"the target's answers to {cfg.data}" if cfg.answers == "target" else cfg.data
        pc = PrunedConfig(keep=tuple(chosen["keep"]), rank=cfg.rank, layers=mc.num_hidden_layers,
                          vocab_size=loaded.vocab_size, hidden=mc.hidden_size, target=loaded.name,
                          target_fingerprint=fingerprint(loaded.model),
                          trained=f"{cfg.objective} on {data}, {cfg.steps} steps of {cfg.batch_size}, seed {cfg.seed}")
        save_pruned(model, pc, out)
        # figures of the drafter as stored (float16 updates) on its int4 grid, with float activations
        saved = load_pruned(out, loaded, serve=False)
        extra = {"keep": chosen["keep"], "block_influence": chosen["block_influence"]}
    report = {"config": {**asdict(cfg), "feature_layers": list(cfg.feature_layers)}, "drafter": str(out),
              "train_texts": len(train_texts.lengths), "train_tokens": meta["train_tokens"],
              "draft_vocab_coverage": _coverage(train_texts, meta["vocab"]), **extra,
              "held_out": held_out_report(saved, held, cfg)}
    tmp = folder / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, folder / "report.json")
    return report


def _coverage(texts: Texts, vocab: list[int]) -> float:
    """Share of the target's greedy tokens (over the training texts) inside the draft vocabulary."""
    inside = torch.zeros(max(int(texts.fields["top1"].max()), max(vocab)) + 1, dtype=torch.bool)
    inside[torch.tensor(vocab)] = True
    return float(inside[texts.fields["top1"].long()].float().mean())
