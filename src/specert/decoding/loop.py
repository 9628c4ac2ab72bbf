"""Speculative decoding of a causal LM under any acceptance rule, in chain or tree mode, with a per-step trace.

Glossary (vLLM's conventions):

- **drafted** tokens: what the drafter proposes at a step; a chain of k tokens, or a tree whose nodes at depth d are
  the drafter's top-w_d tokens after their parent (``--tree 4,2,1``). A *position* is a point where drafted
  tokens wait for the target's verdict: the root (after the context) and every node with children.
- **accepted** tokens: drafted tokens the rule accepts along the longest accepted path from the root.
- **bonus** token: the target's greedy token after the accepted path, emitted for free by the same target forward:
  it *corrects* the first rejected position, or extends a path accepted to its end.
- one step = one target forward; it emits accepted + 1 tokens. **Acceptance length** = 1 + accepted / drafts (the
  bonus token included), averaged over steps that drafted anything.

One step reads in one screen (``_step``): propose a tree, verify every node in one target forward with a tree
attention mask, accept the longest path, sync the caches. The target's KV cache always holds the context except
its last token, which opens the next forward; after a step only the accepted path's entries are kept. The
drafter's cache is synced by common prefix at its next proposal (when every draft is accepted, it re-reads the
last drafted token and the bonus token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specert.decoding.drafts import Drafter, DraftTree, is_chain, tree_attention
from specert.decoding.forward import (
    cache_length,
    forward_features,
    keep_cache,
    new_cache,
    rollback_problem,
    tree_problem,
)
from specert.decoding.models import LoadedModel
from specert.decoding.schedules import History, Schedule, make_schedule
from specert.decoding.trace import StepTrace, trace_positions
from specert.theory.acceptance import tokens_accepted
from specert.theory.rules import Rule
from specert.theory.rules import rule as as_rule
from specert.theory.tensors import argmax


@dataclass
class Generation:
    """What one call of :func:`generate` produced."""

    prompt: list[int]
    tokens: list[int]  # generated tokens, EOS included when produced
    seconds: float  # decoding wall time, tracing excluded
    accepted: list[int] = field(default_factory=list)  # accepted drafted tokens per step
    drafted: list[int] = field(default_factory=list)  # positions with drafted tokens per step (the chain length)
    verified: list[int] = field(default_factory=list)  # tokens the target ran per step (1 + tree nodes)
    trace: list[StepTrace] = field(default_factory=list)
    audit: dict = field(default_factory=dict)  # the certified schedule's guarantee audit (specert.decoding.schedules)

    @property
    def steps(self) -> int:
        return len(self.verified)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _longest_path(tree: DraftTree, ok: list[bool], score: list[float]) -> list[int]:
    """Nodes of the longest path of accepted nodes from the root (ties: the higher target logit first)."""
    length = [0] * len(tree.tokens)
    for i in reversed(range(len(tree.tokens))):
        if ok[i]:
            kids = [length[c] for c in tree.children(i) if ok[c]]
            length[i] = 1 + max(kids, default=0)
    path, pos = [], -1
    while True:
        kids = [c for c in tree.children(pos) if ok[c]]
        if not kids:
            return path
        pos = max(kids, key=lambda c: (length[c], score[c]))
        path.append(pos)


@torch.inference_mode()
def _step(target, cache, drafter: Drafter, r: Rule, context: list[int], schedule: Schedule):
    """One speculative step: returns (emitted tokens, tree, target logits [1 + N, V], path)."""
    t0 = time.perf_counter()
    tree = drafter.propose(context, schedule)  # 1. propose
    t1 = time.perf_counter()
    past = cache_length(cache)
    n = len(tree.tokens)
    chain = is_chain(tree.parents)
    attend, positions = None, None
    if not chain:  # 2. verify every node in one forward: each sees the context, its ancestors and itself
        root = torch.arange(past + 1 + n) <= past  # [past + 1 + n]: the root sees the context and itself
        # [1 + n, past + 1 + n]
        attend = torch.cat([root[None], tree_attention(tree.parents, list(range(n)), past + 1)])
        positions = [past] + [past + 1 + d for d in tree.depth]
    tokens = [context[-1]] + tree.tokens
    logits, states = forward_features(target.model, cache, tokens, drafter.feature_layers, positions, attend)
    t2 = time.perf_counter()
    if n:  # 3. accept: each node judged at its parent's position
        parent_rows = torch.tensor([p + 1 for p in tree.parents])
        drafted = torch.tensor(tree.tokens)
        ok = tokens_accepted(logits[parent_rows], drafted, r).tolist()
        score = logits[parent_rows].gather(-1, drafted[:, None])[:, 0].tolist()
        path = _longest_path(tree, ok, score)
    else:
        path = []
    bonus = int(argmax(logits[path[-1] + 1 if path else 0]))
    keep_cache(cache, past + 1, [past + 1 + i for i in path])  # 4. sync: keep the accepted path only
    if states is not None:  # a drafter reading the target's states gets those of the kept tokens
        drafter.target_ran(past, states[[0] + [1 + i for i in path]])
    schedule.observe(tree, logits, path)
    schedule.timed(t1 - t0 + time.perf_counter() - t2, t2 - t1, n)  # all but the target's forward, and that
    return [tree.tokens[i] for i in path] + [bonus], tree, logits, path


def generate(target: LoadedModel, prompt: list[int], drafter: Drafter | None = None, rule: str | Rule = "greedy",
             k: int | str | None = None, tree: str | list[int] | None = None, max_new_tokens: int = 128,
             trace: bool = False, stop_at_eos: bool = True, quantile: float = 0.9,
             progress: Callable[[int], object] | None = None) -> Generation:
    """Decode greedily from ``prompt`` (token ids) with speculative verification under ``rule``.

    Without a drafter this is plain greedy decoding, one target forward per token. With strict greedy the output
    equals the target's own greedy output token for token, whatever the drafter.

    Args:
        target: the target model.
        prompt: prompt token ids (see :func:`specert.decoding.models.encode_prompt`).
        drafter: a :class:`~specert.drafters.Drafter`, or None.
        rule: acceptance rule (spec or object); ``tree:m`` verifies as strict greedy.
        k: chain length, ``"auto[:K]"`` or ``"heuristic[:K]"`` (default: the drafter's ``default_k``); or ``tree``:
            widths per depth such as ``"4,2,1"``, or ``"auto[:B]"`` (see :mod:`specert.decoding.schedules`).
        max_new_tokens: at most this many generated tokens.
        trace: record a :class:`~specert.decoding.trace.StepTrace` per verified position (certificates, KL, ...).
        stop_at_eos: stop after the model's end-of-sequence token.
        quantile: the quantile of observed KLs that the certified (auto) schedules use as eps_hat.
        progress: called after each step with the number of tokens it added (a progress bar's ``update``).
    """
    r = as_rule(rule)
    if drafter is not None and drafter.history is None:
        drafter.history = History()
    if drafter is not None and k is None and tree is None:
        k = drafter.default_k
    schedule = make_schedule(k, tree, quantile, drafter.history) if drafter is not None else None
    if not prompt:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    drafts = schedule.max_nodes if schedule else 0
    if len(prompt) + max_new_tokens + drafts > target.context_length:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) + drafts exceed the context of "
            f"{target.context_length} tokens"
        )
    r.validate(target.vocab_size)
    if drafter is not None:  # before any work: a model that cannot be rolled back, or take a tree's mask
        problem = rollback_problem(target.model) or (tree_problem(target.model) if tree is not None else None)
        if problem:
            raise ValueError(f"drafter {drafter.spec!r} cannot run on {target.name!r} "
                             f"({type(target.model).__name__}): {problem}")
    eos = target.eos_token_ids if stop_at_eos else set()
    cache = new_cache(target.model)
    out = Generation(list(prompt), [], 0.0)
    traced = 0.0
    start = time.perf_counter()
    layers = drafter.feature_layers if drafter is not None else ()
    with torch.inference_mode():
        states = None
        if len(prompt) > 1:  # prefill all but the last token
            _, states = forward_features(target.model, cache, prompt[:-1], layers, last_only=True)
            if drafter is not None:
                drafter.target_prefilled(prompt[:-1], cache)
        if layers:  # (re)starts the drafter's mirror of the target's cache
            drafter.target_ran(0, states)
        context = list(prompt)
        while len(out.tokens) < max_new_tokens:
            room = max_new_tokens - len(out.tokens) - 1  # the bonus token comes free
            if drafter is None or room < 1 or not schedule.should_draft():
                logits, states = forward_features(target.model, cache, [context[-1]], layers)
                if states is not None:
                    drafter.target_ran(len(context) - 1, states)
                emitted, tree_, path = [int(argmax(logits[-1]))], None, []
            else:
                schedule.room = room
                emitted, tree_, logits, path = _step(target, cache, drafter, r, context, schedule)
                drafter.observe(len(path))
            emitted = emitted[: max_new_tokens - len(out.tokens)]
            for i, tok in enumerate(emitted):
                if tok in eos:
                    emitted = emitted[: i + 1]
                    break
            out.tokens += emitted
            if progress is not None:
                progress(len(emitted))
            context += emitted
            out.accepted.append(len(path))
            out.drafted.append(max((tree_.depth[i] + 1 for i in range(len(tree_.tokens))), default=0) if tree_ else 0)
            out.verified.append(1 + (len(tree_.tokens) if tree_ else 0))
            if trace and tree_ is not None:
                t0 = time.perf_counter()
                rows = trace_positions(out.steps - 1, len(out.tokens) - len(emitted), tree_, logits, path, r)
                out.trace += [row for row in rows if row.token_index < len(out.tokens)]  # within the budget
                traced += time.perf_counter() - t0
            if emitted[-1] in eos:
                break
    out.seconds = time.perf_counter() - start - traced
    out.audit = schedule.audit() if schedule else {}
    return out
