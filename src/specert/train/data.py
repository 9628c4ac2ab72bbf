"""What a drafter learns from: the training texts and the target's outputs on them, cached on disk.

Two phases in a work folder, each resumable after an interruption (every part is written whole, atomically, or not
at all):

1. ``meta.json`` (:func:`prepare`): the sample of training text (deterministic), its tokenization, the draft
   vocabulary S (the most frequent tokens) and the held-out split. With ``answers="target"`` (self-distillation, as
   Medusa-2 recommends when the data's answers are not the target's) each text is the conversation's first user
   turn followed by the target's own greedy answer, generated in batches into ``answers/part-NNNNN.json`` first
   (:func:`target_answers`).
2. ``cache/part-NNNNN.pt`` (:func:`build_cache`): the target run once, teacher-forced, over every text. Per position
   it keeps

   ================  ==================================================================================
   field             value at position t (p: the target's next-token distribution after tokens 0..t)
   ================  ==================================================================================
   ``features``      hidden states at the fused layers, concatenated ``[nl * H]``, float16
   ``tokens``        token t
   ``lse``           log sum_V exp(logits), the log-normaliser
   ``log_rest``      log p_rest = log sum_{j not in S} p_j
   ``rest_plogp``    sum_{j not in S} p_j log p_j
   ``certificate``   C_p of the served rule (:func:`specert.theory.certificates.certificate`)
   ``top1``          the target's greedy token
   ================  ==================================================================================

   all computed from the float16 ``features`` (the final states' slice times the LM head), so training sees exactly
   the p the cache describes. :func:`load_cache` reads the parts back as two :class:`Texts`, train and held out.

NOTE: self-distillation did not raise agreement on the target's own answers on the embedded model (teacher-forced
agreement per answer position, shipped head against self-distilled head, measured by ``specert distill --answers
target --texts 600``; docs/drafters.md, "Which drafter pays on the embedded model").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specert.decoding.forward import batched_greedy
from specert.decoding.models import LoadedModel, encode_prompt
from specert.drafters.storage import fingerprint
from specert.files import save_torch, write_json
from specert.study.prompts import training_chats
from specert.theory.certificates import certificate
from specert.theory.rules import rule
from specert.train.config import DistillConfig

# NOTE: fixed rather than an option: which prompts share a batch (and its padding) can change a greedy answer where
# two logits nearly tie, and the cache's key does not record it.
GENERATION_BATCH = 32  # prompts answered at once in self-distillation
CACHE_BATCH = 8  # texts run through the target at once when caching


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
        for _, _, tokens, alive in batched_greedy(loaded.model, rows, steps, eos):  # tokens, alive: [B]
            for r, (t, a) in enumerate(zip(tokens.tolist(), alive.tolist())):
                if a and len(rows[r]) + len(answers[r]) < cfg.max_tokens:
                    answers[r].append(t)
                    bar.update(1)
        bar.update(sum(cfg.max_tokens - len(p) - len(a) for p, a in zip(rows, answers)))  # ended early
        write_json(folder / f"part-{c:05d}.json", {"index": chunks[c], "answers": answers}, indent=None)
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
        meta["config"].setdefault("answers", "data")  # a meta.json without the option holds the data's own texts
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
    write_json(path, meta, indent=None)
    return meta


@torch.inference_mode()
def target_outputs(loaded: LoadedModel, seqs: list[list[int]], layers: tuple[int, ...], vocab: torch.Tensor,
                   served) -> dict:
    """The target run teacher-forced over ``seqs`` (one batch): the cached fields (module docstring) of every
    position, concatenated over sequences (``[N, ...]``, N the total length), with ``lengths`` ``[B]``.

    ``vocab`` ``[S]`` is the draft vocabulary, ``served`` the rule whose certificate is kept."""
    model = loaded.model
    b, width = len(seqs), max(map(len, seqs))
    ids = torch.zeros(b, width, dtype=torch.long)  # [B, T], right-padded
    mask = torch.zeros(b, width, dtype=torch.long)  # [B, T]
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
        logp = logits - lse[:, None]  # [T, V]
        logp_s = logp[:, vocab].double()  # [T, S]
        p_rest = (1 - logp_s.exp().sum(-1)).clamp(min=0)  # [T]
        out["features"].append(feats[i, :n])
        out["tokens"].append(torch.tensor(s, dtype=torch.int32))
        out["lse"].append(lse)
        out["log_rest"].append(p_rest.log().float())
        plogp = (logp.exp() * logp).sum(-1).double()  # [T]: sum_V p log p (logits of a matmul are finite)
        out["rest_plogp"].append((plogp - (logp_s.exp() * logp_s).sum(-1)).clamp(max=0).float())
        out["certificate"].append(certificate(logits, served).float())  # [T]
        out["top1"].append(logits.argmax(-1).int())  # [T]
    cat = {k: torch.cat(v) for k, v in out.items()}
    cat["lengths"] = torch.tensor([len(s) for s in seqs])
    return cat


def build_cache(cfg: DistillConfig, loaded: LoadedModel, meta: dict, work: Path, progress: bool = True,
                batch: int = CACHE_BATCH) -> None:
    """Phase 2: the target's outputs for every text, in parts (held-out first); existing parts are kept."""
    layers = tuple(cfg.feature_layers)
    vocab = torch.tensor(meta["vocab"])  # [S]
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
        part["index"] = torch.tensor(chunks[c])  # [B]: position of each text in held_out + train
        save_torch(work / "cache" / f"part-{c:05d}.pt", part)
        bar.update(int(part["lengths"].sum()))
    bar.close()


@dataclass
class Texts:
    """Cached target outputs of a set of texts, one tensor per field (``[N, ...]``, N the texts' total length),
    text i at rows ``offsets[i] .. offsets[i] + lengths[i]``."""

    fields: dict
    offsets: list[int]
    lengths: list[int]

    def batch(self, which: list[int]) -> dict:
        """Right-padded ``[B, T, ...]`` tensors of the given texts and ``valid`` ``[B, T]``."""
        width = max(self.lengths[i] for i in which)
        out = {}
        for name, t in self.fields.items():
            pad = torch.zeros((len(which), width) + t.shape[1:], dtype=t.dtype)  # [B, T, ...]
            for row, i in enumerate(which):
                pad[row, : self.lengths[i]] = t[self.offsets[i] : self.offsets[i] + self.lengths[i]]
            out[name] = pad
        valid = torch.zeros(len(which), width, dtype=torch.bool)  # [B, T]
        for row, i in enumerate(which):
            valid[row, : self.lengths[i]] = True
        out["valid"] = valid
        return out

    def vocab_coverage(self, vocab: list[int]) -> float:
        """Share of the target's greedy tokens over these texts that lie inside the draft vocabulary ``vocab``."""
        top1 = self.fields["top1"].long()  # [N]
        inside = torch.zeros(max(int(top1.max()), max(vocab)) + 1, dtype=torch.bool)
        inside[torch.tensor(vocab)] = True
        return float(inside[top1].float().mean())


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
