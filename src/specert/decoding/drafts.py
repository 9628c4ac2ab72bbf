"""What a drafter hands the verifier: a draft tree, and the small interface every drafter implements.

Glossary (vLLM's conventions, :mod:`specert.decoding.loop`): a drafter *proposes* a draft tree after a context. The
*root* is the context's end (position -1, not a node); each node's children are the drafter's top-w tokens after the
path to it, w given by a :mod:`~specert.decoding.schedules` schedule; a chain of k tokens is the schedule
``[1] * k``. The tree carries the drafter's logits at every *expanded* position (the distribution q its children
were drawn from) or, for drafters with no distribution (n-gram lookup), ``None``: their drafts are judged by the
rule on the token alone (for strict greedy: exact match). Implementations live in :mod:`specert.drafters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specert.theory.tensors import argmax

if TYPE_CHECKING:
    from specert.decoding.schedules import History, Schedule


@dataclass
class DraftTree:
    """Nodes in breadth-first order; the root (the context's end) is position -1, not a node."""

    tokens: list[int]  # [N] drafted token of each node
    parents: list[int]  # [N] parent node, -1 for the root's children
    logits: torch.Tensor | None  # [1 + N, V] drafter logits after the root (row 0) and after each node (row 1 + i)
    expanded: list[bool]  # [1 + N] whether the drafter scored that position (leaves are not scored)

    @property
    def depth(self) -> list[int]:
        d = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def children(self, position: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == position]


def is_chain(parents: list[int]) -> bool:
    """Whether nodes with these parents form a chain (each node the child of the one before)."""
    return all(p == i - 1 for i, p in enumerate(parents))


def top_tokens(logits: torch.Tensor, width: int) -> list[int]:
    """The ``width`` most probable tokens of one row of logits ``[V]``, most probable first (one token, a chain's:
    :func:`~specert.theory.tensors.argmax`, far faster than ``topk`` on a CPU)."""
    return [int(argmax(logits))] if width == 1 else torch.topk(logits, width).indices.tolist()


def ancestors(parents: list[int]) -> torch.Tensor:
    """Bool ``[N, N]``: ``a[i, j]`` iff node j is node i or one of its ancestors."""
    n = len(parents)
    a = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            a[i] |= a[p]
    return a


def tree_attention(parents: list[int], nodes: list[int], context: int) -> torch.Tensor:
    """Which slots each of ``nodes`` sees when a forward runs them after ``context`` slots (the context) and the
    tree's nodes before them (node i at slot ``context + i``): every context slot, its ancestors and itself.

    Returns bool ``[len(nodes), context + max(nodes) + 1]`` (True: attended), the ``attend`` argument of
    :func:`~specert.decoding.forward.forward` for a tree level, or for a whole tree verified in one forward.
    """
    end = max(nodes) + 1
    nodes_seen = ancestors(parents[:end])[nodes]  # [len(nodes), end]
    return torch.cat([torch.ones(len(nodes), context, dtype=torch.bool), nodes_seen], -1)


class Drafter:
    """Interface: ``propose`` a draft tree after a context; ``observe`` how many drafted tokens were accepted.

    A drafter that reads the target's hidden states names their layers in ``feature_layers``; the decoder then
    hands it, through ``target_ran``, the states of every token it puts in the target's KV cache.
    """

    spec: str = "?"
    feature_layers: tuple[int, ...] = ()
    history: History | None = None  # what the certified schedules measured about it so far (set by the decoder)
    default_k: int | str = 4  # the draft shape :func:`~specert.decoding.loop.generate` uses when given none

    def target_prefilled(self, tokens: list[int], cache) -> None:
        """The target's KV ``cache`` now holds the prompt ``tokens`` (default: nothing to do)."""

    def target_ran(self, start: int, features: torch.Tensor | None) -> None:
        """The target's cache now holds the context up to ``start + len(features)``; ``features`` ``[n, nl * H]``
        are the hidden states of positions ``start ..`` (only drafters with ``feature_layers`` get them)."""

    def propose(self, context: list[int], schedule: Schedule) -> DraftTree:
        """Draft a tree after ``context`` (whose last token the target has not run yet), shaped by ``schedule``."""
        raise NotImplementedError

    def observe(self, accepted: int) -> None:
        """Learn what the verifier accepted (default: nothing to learn)."""
