"""The n-gram drafter (prompt lookup): it copies what followed the context's end where it occurred before."""

from __future__ import annotations

import torch

from specert.decoding.drafts import Drafter, DraftTree
from specert.decoding.schedules import CERTIFIED, Schedule


class NGramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the longest matching suffix (at most ``n`` tokens) in the context,
    most frequent first. A drafted token copied from position j is followed, first, by the token at j + 1: a chain
    copies a whole span, as transformers' prompt lookup and vLLM's n-gram proposer do. No distribution: drafts are
    judged on the token alone.

    What it has instead is the size of the match behind each token: the suffix found for a looked-up token, the
    tokens before the copied one that agree with the context's end for a copied one (at most ``n``). It tells much:
    on Spec-Bench's first 6 prompts per category (the target's greedy outputs, chains of ``ngram:3``), a token
    behind a match of 1 token was the target's 19% of the time, of 2: 44-50%, of 3: 72-76%. A certified chain
    (:class:`~specert.decoding.schedules.CertifiedSchedule`) gets it as the position's class,
    ``min(size, CERTIFIED) - 1``, with the token (``guess``), and measures each class's acceptance."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"ngram:N needs N >= 1, got {n}")
        self.n, self.spec = n, f"ngram:{n}"

    def continuations(self, seq: torch.Tensor) -> tuple[int, list[tuple[int, int]]]:
        """(the size of the longest suffix of ``seq`` found earlier in it, at most ``n``; ``(token, position)``: the
        tokens that followed its earlier occurrences, most frequent first, each with the position in ``seq`` of its
        most recent such occurrence); (0, []) when not even the last token occurred before."""
        for size in range(min(self.n, len(seq) - 1), 0, -1):
            suffix = seq[-size:]
            windows = seq[:-1].unfold(0, size, 1)  # [T - size, size]; a window must have a successor
            hits = (windows == suffix).all(-1).nonzero()[:, 0]
            if len(hits):
                nxt = seq[hits + size]
                values, counts = nxt.unique(return_counts=True)
                # most frequent first, then the most recent occurrence
                last = torch.stack([hits[nxt == v].max() for v in values]) + size
                order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), -int(last[i])))
                return size, [(int(values[i]), int(last[i])) for i in order]
        return 0, []

    def copied(self, path: list[int], src: int) -> int:
        """The size of the match behind copying ``path[src + 1]``: how many tokens ending at ``src`` agree with the
        end of ``path`` (at least 1: ``path[src]`` is its last token, copied from there), at most ``n``."""
        size = 0
        while size < self.n and size <= src and path[-1 - size] == path[src - size]:
            size += 1
        return size

    def propose(self, context: list[int], schedule: Schedule) -> DraftTree:
        tokens, parents, paths, sources = [], [], {-1: list(context)}, {-1: None}
        frontier = [-1]
        for depth in range(schedule.depths):
            found = []  # per frontier position: (match size, candidates), the copied token first
            for pos in frontier:
                path, src = paths[pos], sources[pos]
                found.append((self.copied(path, src), [(path[src + 1], src + 1)]) if src is not None
                             else self.continuations(torch.tensor(path)))
            if not any(span for _, span in found):
                break
            size, span = found[0]
            guess = (min(size, CERTIFIED) - 1, span[0][0]) if len(frontier) == 1 else None
            widths = schedule.widths(depth, None, len(frontier), schedule.budget - len(tokens), guess=guess)
            nxt = []
            for pos, width, (_, span) in zip(frontier, widths, found):
                path = paths[pos]
                if width > len(span) and sources[pos] is not None:  # a tree: the other continuations too
                    span = span + [c for c in self.continuations(torch.tensor(path))[1] if c[0] != span[0][0]]
                for tok, at in span[:width]:
                    tokens.append(tok)
                    parents.append(pos)
                    paths[len(tokens) - 1], sources[len(tokens) - 1] = path + [tok], at
                    nxt.append(len(tokens) - 1)
            frontier = nxt  # empty: the next depth finds no candidates and stops
        return DraftTree(tokens, parents, None, [False] * (1 + len(tokens)))
