"""The study on a served target: the target's greedy text and, at every step, its K most probable tokens, from an
OpenAI-compatible server (:mod:`specert.served.client`); certificates and KL as intervals from that top K
(:mod:`specert.theory.truncated`, THEORY.md section 9).

The same phases and files as the in-process study (:mod:`specert.study.evaluation`), with these differences:

- ``steps/part-NNNNN.parquet``: ``cert:RULE`` is the certificate's lower end (sound: it may understate, never
  overstate), beside ``cert_upper:RULE`` and ``exact:RULE`` (the top K determine it); ``entropy`` is its lower end
  beside ``entropy_upper``; ``top10_mass`` sums the top min(10, K). ``topk/part-NNNNN.parquet`` keeps each step's
  top K for the drafters' phase.
- ``drafters/<drafter>/part-NNNNN.parquet``: ``kl`` and ``kl_upper`` bound KL(p || q); ``certified:RULE`` is true
  only where the step is certified whatever the unknown tail (KL's upper end below the certificate's lower end),
  ``undetermined:RULE`` where the intervals overlap; ``accepted:RULE`` is the rule's verdict on the drafter's token
  where the top K decide it (``decided:RULE``).
- No real decoding: the server decodes; its own speculative decoding is checked by :mod:`specert.served.engine`.

Drafters on the served path: ``served:URL[#MODEL]`` (a second served model, teacher-forced along the target's greedy
text through prompt log-probabilities: its top K' and its log-probability of the target's greedy token),
``model:SPEC`` (a model loaded in-process: the full q) and ``ngram:N`` (a token, no distribution).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from specert.decoding.models import load_model
from specert.drafters.model import ModelDrafter
from specert.drafters.ngram import NGramDrafter
from specert.served.client import Continuation, ServedError, ServedModel
from specert.study.prompts import Prompt
from specert.theory.certificates import drafter_certificate
from specert.theory.truncated import (
    TOTAL_TOLERANCE,
    Interval,
    TopK,
    decide,
    entropy_interval,
    truncated_accepts,
    truncated_certificates,
    truncated_kl,
)

# The drafter kinds a served target takes (the others are built from the target's own weights, which a served
# target does not hand over).
SERVED_DRAFTERS = ("served", "model", "ngram")


def served_topk(logprobs: np.ndarray, ids: np.ndarray, vocab_size: int) -> TopK:
    """The top K a server returned, as :class:`~specert.theory.truncated.TopK`.

    A server computes log p = l - logsumexp(l) in float32: the normaliser's rounding shifts every log-probability of
    a step by one shared offset, of order sqrt(V) 2^-24 (V 2^-24 at worst), so that the known probabilities may sum
    to a little more than 1. Their sum is allowed to exceed 1 by V 2^-24; where the server returned every token
    (K = V) the step is renormalised, which removes the offset exactly.
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)  # [S, K]
    if logprobs.shape[-1] == vocab_size:
        logprobs = logprobs - np.logaddexp.reduce(logprobs, axis=-1, keepdims=True)
    return TopK(logprobs, ids, vocab_size, total_tolerance=max(TOTAL_TOLERANCE, vocab_size * 2.0**-24))


def check_served_drafter(spec: str) -> None:
    """Refuse a drafter spec a served target cannot use, before any work."""
    kind = spec.partition(":")[0]
    if kind not in SERVED_DRAFTERS:
        raise ValueError(f"drafter {spec!r} is built from the target's own weights, which a served target does not "
                         "hand over; use served:URL[#MODEL], model:SPEC or ngram:N")


@dataclass
class ServedDrafter:
    """A drafter of the served study: a served model, an in-process model or n-gram lookup."""

    spec: str
    served: ServedModel | None = None
    model: ModelDrafter | None = None
    ngram: NGramDrafter | None = None


def served_drafter(spec: str, target: ServedModel, vocab_size: int, concurrency: int, timeout: float,
                   retries: int) -> ServedDrafter:
    """Build a drafter of the served study from its spec (see the module docstring)."""
    check_served_drafter(spec)
    kind, _, arg = spec.partition(":")
    if kind == "ngram":
        return ServedDrafter(spec, ngram=NGramDrafter(int(arg or 3)))
    if kind == "served":
        url, _, name = arg.partition("#")
        client = ServedModel(url, name or None, concurrency, timeout, retries)
        client.check()
        return ServedDrafter(spec, served=client)
    loaded = load_model(arg)
    if loaded.vocab_size != vocab_size:
        raise ValueError(f"drafter {spec!r} has a vocabulary of {loaded.vocab_size} tokens but the served target has "
                         f"{vocab_size}: a drafter must share the target's vocabulary")
    return ServedDrafter(spec, model=ModelDrafter(loaded.model, spec))


def encode_served(target: ServedModel, prompts: list[Prompt], steps: int, max_prompt_tokens: int,
                  context_length: int) -> tuple[dict[int, list[int]], int]:
    """Token ids of each prompt through the server's chat template (prompts too long dropped), and how many were
    dropped."""
    def one(p: Prompt):
        if len(p.text) >= 20 * max_prompt_tokens:
            return None
        return target.tokenize([{"role": "user", "content": p.text}])

    with ThreadPoolExecutor(target.concurrency) as pool:
        ids = list(pool.map(one, prompts))
    encoded = {i: x for i, x in enumerate(ids)
               if x is not None and len(x) <= max_prompt_tokens and len(x) + steps <= context_length}
    return encoded, len(prompts) - len(encoded)


def served_target_part(target: ServedModel, prompts: list[Prompt], encoded: dict[int, list[int]], batch: list[int],
                       steps: int, k: int, vocab_size: int, rules: tuple[str, ...], bar=None) -> tuple[pa.Table,
                                                                                                       pa.Table]:
    """Phase 1 for one batch of prompts, its requests ``target.concurrency`` at a time: the steps table (as the
    in-process study's, with certificate intervals) and the top K of every step."""
    def one(i: int) -> Continuation:
        out = target.greedy(encoded[i], steps, k)
        if bar is not None:
            bar.update(len(out.tokens))
        return out

    with ThreadPoolExecutor(target.concurrency) as pool:
        done = list(pool.map(one, batch))
    index = np.concatenate([[i] * len(c.tokens) for i, c in zip(batch, done)]).astype(np.int64)
    step = np.concatenate([np.arange(len(c.tokens)) for c in done]).astype(np.int64)
    logp = np.concatenate([c.top_logprobs for c in done])  # [S, K]
    ids = np.concatenate([c.top_ids for c in done])  # [S, K]
    tokens = np.concatenate([c.tokens for c in done]).astype(np.int64)
    for c in done:
        if c.tokens and c.top_ids[:, 0].tolist() != c.tokens:
            raise ServedError("the server's tokens are not the most probable of their steps: it is not decoding "
                              "greedily (check that no sampling parameters are forced server-side)")
    topk = served_topk(logp, ids, vocab_size)
    logp = np.asarray(topk.logprobs)  # [S, K] (renormalised where K = V)
    p = np.exp(logp)
    entropy = entropy_interval(topk)
    cols = {"prompt_index": index, "prompt_id": [prompts[i].id for i in index],
            "category": [prompts[i].category for i in index], "step": step, "token": tokens, "p_top1": p[:, 0],
            "top10_mass": p[:, :10].sum(-1), "margin": p[:, 0] - (p[:, 1] if k > 1 else 0.0),
            "entropy": np.asarray(entropy.lower), "entropy_upper": np.asarray(entropy.upper)}
    table = pa.table(cols)
    for r, interval in truncated_certificates(topk, rules).items():
        table = table.append_column(f"cert:{r}", pa.array(np.asarray(interval.lower), pa.float64()))
        table = table.append_column(f"cert_upper:{r}", pa.array(np.asarray(interval.upper), pa.float64()))
        table = table.append_column(f"exact:{r}", pa.array(np.asarray(interval.exact), pa.bool_()))
    top = pa.table({"prompt_index": index, "step": step, "top_ids": pa.array(list(ids), pa.list_(pa.int64())),
                    "top_logprobs": pa.array(list(logp), pa.list_(pa.float64()))})
    return table, top


def served_drafter_part(drafter: ServedDrafter, encoded: dict[int, list[int]], greedy: dict[int, list[int]],
                        top: pa.Table, batch: list[int], k: int, vocab_size: int, rules: tuple[str, ...]) -> pa.Table:
    """Phase 2 for one drafter and one batch: the drafter teacher-forced along the target's greedy text, judged
    against the target's top K of each step (``top``: the steps of ``batch``, in prompt and step order)."""
    rows = [i for i in batch if greedy[i]]
    index = np.asarray(top.column("prompt_index").to_pylist(), dtype=np.int64)
    keep = np.isin(index, rows)
    logp = np.asarray(top.column("top_logprobs").to_pylist(), dtype=np.float64)[keep]  # [S, K]
    ids = np.asarray(top.column("top_ids").to_pylist(), dtype=np.int64)[keep]
    target = served_topk(logp, ids, vocab_size)
    seqs = {i: encoded[i] + greedy[i] for i in rows}
    n = len(ids)
    if drafter.ngram is not None:
        draft = np.concatenate([[(drafter.ngram.continuations(torch.tensor(seqs[i][: len(encoded[i]) + t]))[1]
                                  or [(-1, -1)])[0][0] for t in range(len(greedy[i]))] for i in rows])
        kl = Interval(np.full(n, math.nan), np.full(n, math.nan), np.zeros(n, bool))
        d_q = np.full(n, math.nan)
    elif drafter.model is not None:
        q = torch.cat([drafter.model.score(seqs[i][:-1], len(encoded[i]) - 1)[len(encoded[i]) - 1:].double()
                       for i in rows])  # [S, V]
        draft = q.argmax(-1).numpy()
        kl = truncated_kl(target, q.numpy())
        d_q = np.asarray(drafter_certificate(q, 1))
    else:
        client = drafter.served

        def one(i):
            return client.score(seqs[i], len(encoded[i]), k)

        with ThreadPoolExecutor(client.concurrency) as pool:
            scores = list(pool.map(one, rows))
        q_logp = np.concatenate([s.top_logprobs for s in scores])  # [S, K]
        q_ids = np.concatenate([s.top_ids for s in scores])
        at_target = np.full((n, target.k), math.nan)
        at_target[:, 0] = np.concatenate([s.token_logprob for s in scores])  # q of the target's greedy token
        kl = truncated_kl(target, served_topk(q_logp, q_ids, vocab_size), at_target)
        draft = q_ids[:, 0]
        # D_q(1) = -log(1 - (sqrt(q_1) - sqrt(q_2))^2) (THEORY.md section 7) from q's two most probable tokens
        gap = (np.exp(q_logp[:, 0] / 2) - np.exp(q_logp[:, 1] / 2)) ** 2 if k > 1 else np.full(n, math.nan)
        d_q = -np.log1p(-gap)
    cols = {"prompt_index": index[keep], "step": np.asarray(top.column("step").to_pylist())[keep],
            "draft_token": draft, "kl": np.asarray(kl.lower, dtype=float),
            "kl_upper": np.asarray(kl.upper, dtype=float),
            "drafter_certificate": d_q}
    table = pa.table(cols)
    has = torch.as_tensor(draft) >= 0
    certs = truncated_certificates(target, rules)
    for r in rules:
        accepted, decided = truncated_accepts(target, torch.as_tensor(draft).clamp(min=0), r)
        accepted, decided = np.asarray(accepted) & has.numpy(), np.asarray(decided) | ~has.numpy()
        if drafter.ngram is not None:
            certified = undetermined = np.zeros(n, bool)
        else:
            verdict = decide(kl, certs[r])
            certified, undetermined = np.asarray(verdict.certified), np.asarray(verdict.undetermined)
        table = table.append_column(f"accepted:{r}", pa.array(accepted))
        table = table.append_column(f"decided:{r}", pa.array(decided))
        table = table.append_column(f"certified:{r}", pa.array(certified))
        table = table.append_column(f"undetermined:{r}", pa.array(undetermined))
        table = table.append_column(f"cert:{r}", pa.array(np.asarray(certs[r].lower), pa.float64()))
    return table.append_column("drafter", pa.array([drafter.spec] * len(table), pa.string()))


def vocab_size_of(entry: dict, given: int) -> int:
    """The served model's vocabulary size (the logits' width): ``given`` (``--vocab-size``) if set, else read from
    the ``config.json`` of the folder or cached hub id the server loaded (its ``/v1/models`` ``root``)."""
    if given:
        return given
    from transformers import AutoConfig

    root = entry.get("root") or entry.get("id")
    try:
        config = AutoConfig.from_pretrained(root)
        size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    except Exception:  # noqa: BLE001 (a hub id not cached here, a folder on another machine, a foreign config)
        size = None
    if not size:
        raise ValueError(f"cannot read the vocabulary size of served model {entry.get('id')!r} (loaded from {root!r}, "
                         "not readable here): give it with --vocab-size (the model config's vocab_size)")
    return int(size)
