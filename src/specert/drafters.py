"""Drafters: cheap proposers of the tokens a target verifies, behind one small interface.

A drafter proposes a *draft tree* after a context: the root is the context's end, and each node's children are the
drafter's top-w tokens after the path to it, w given by a :mod:`~specert.schedules` schedule (fixed per depth, or
decided from the drafter's own certificate). A chain of k tokens is the schedule ``[1] * k``. With the tree the
drafter returns its logits at every expanded position (the distribution q its children were drawn from) or, for
drafters with no distribution (n-gram lookup), ``None``: those drafts are judged by the rule on the token alone
(for strict greedy: exact match).

================  =======================================================================================
spec              drafter
================  =======================================================================================
``model:SPEC``    a separate small causal LM (any model spec of :mod:`specert.models`), same vocabulary
``layerskip:L``   the target's first L layers with its final norm and LM head, sharing its weights
``ngram:N``       prompt lookup: continuations of the longest suffix (N tokens at most) seen in the context
``int4``          the target with 4-bit weights (groups of 32; exact for Q4_1 GGUF layers), LM head int8
``int8``          the target with int8 weights, one scale per row (:mod:`specert.quantized`)
``head[:PATH]``   a draft head trained by ``specert distill`` (:mod:`specert.head`) reading the target's hidden
                  states; without PATH the head shipped for the embedded default
``pruned[:PATH]`` the target with its least useful layers removed and healed by ``specert distill --architecture
                  pruned`` (:mod:`specert.pruned`), int4; without PATH the one shipped for the embedded default
``compiled:SPEC`` the model drafter SPEC (``int4``, ``int8``, ``pruned``, ``layerskip:L``, ``model:...``) with its
                  step compiled by ``torch.compile`` over a static KV cache (:mod:`specert.static_cache`)
================  =======================================================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from specert.models import LoadedModel, cache_length, can_step, forward, keep_cache, load_model, new_cache
from specert.quantized import PREFILL_ROWS, quantized_copy
from specert.schedules import CERTIFIED, History, Schedule
from specert.static_cache import StaticCache
from specert.tensors import argmax


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
    :func:`~specert.tensors.argmax`, far faster than ``topk`` on a CPU)."""
    return [int(argmax(logits))] if width == 1 else torch.topk(logits, width).indices.tolist()


def ancestors(parents: list[int]) -> torch.Tensor:
    """Bool ``[N, N]``: ``a[i, j]`` iff node j is node i or one of its ancestors."""
    n = len(parents)
    a = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            a[i] |= a[p]
    return a


class Drafter:
    """Interface: ``propose`` a draft tree after a context; ``observe`` how many drafted tokens were accepted.

    A drafter that reads the target's hidden states names their layers in ``feature_layers``; the decoder then
    hands it, through ``target_ran``, the states of every token it puts in the target's KV cache.
    """

    spec: str = "?"
    feature_layers: tuple[int, ...] = ()
    history: History | None = None  # what the certified schedules measured about it so far (set by the decoder)

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


DECODE_ROWS = PREFILL_ROWS // 2  # tokens per forward when scoring as drafting does: few enough to draft, not prefill


class ModelDrafter(Drafter):
    """A causal LM drafting greedily with its own KV cache, kept in sync with the context by common prefix.

    A drafter made of the target's own first layers (``layers_of_target``: a layer-skip view, a quantized copy)
    starts each prompt from the target's KV cache of it: its layers compute the same entries (a quantized copy
    runs prompts on the shared float weights), so a long prompt is not prefilled twice.

    A tree's entries stay in the cache after its proposal (node i at slot ``base + i``, each computed seeing only
    its ancestors, so a path's entries are those of the path run causally): the next proposal keeps the accepted
    path's and drops the rest, instead of running the path again.
    """

    def __init__(self, model: torch.nn.Module, spec: str, layers_of_target: bool = False, compiled: bool = False):
        self.model, self.spec, self.layers_of_target = model, spec, layers_of_target
        if compiled and not can_step(model):
            raise ValueError(f"drafter {spec!r}: only llama and qwen3 models (full attention) can run compiled; "
                             "drop 'compiled:'")
        self.cache = StaticCache(model) if compiled else new_cache(model)
        if compiled:
            self.cache.warm_up()
        self.cached: list[int] = []  # tokens whose keys and values the cache holds
        self.tree: tuple | None = None  # (base, tokens, parents, nodes run) of the last tree, its entries cached

    def target_prefilled(self, tokens, cache):
        if not self.layers_of_target:
            return
        if isinstance(self.cache, StaticCache):
            self.cache.load(cache)
        else:
            self.cache = new_cache(self.model)
            for i, layer in enumerate(cache.layers[: self.model.config.num_hidden_layers]):
                self.cache.update(layer.keys.clone(), layer.values.clone(), i)
        self.cached, self.tree = list(tokens), None

    def _forward(self, tokens: list[int], positions: list[int] | None = None,
                 attend: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`~specert.models.forward` on the drafter's cache (a static cache runs its own)."""
        if isinstance(self.cache, StaticCache):
            return self.cache.forward(tokens, positions, attend)
        return forward(self.model, self.cache, tokens, positions, attend)

    def _keep(self, keep_from: int, slots: list[int]) -> None:
        """:func:`~specert.models.keep_cache` on the drafter's cache."""
        if isinstance(self.cache, StaticCache):
            self.cache.keep(keep_from, slots)
        else:
            keep_cache(self.cache, keep_from, slots)

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Bring the cache to ``context`` and return the logits after it ``[V]``."""
        if self.tree is not None:
            self._keep_path(context)
        same = 0
        limit = min(len(self.cached), len(context) - 1)  # always re-run at least the last token for its logits
        while same < limit and self.cached[same] == context[same]:
            same += 1
        self._keep(same, [])
        logits = self._run(context[same:])
        self.cached = list(context)
        return logits[-1]

    def _keep_path(self, context: list[int]) -> None:
        """Keep the entries of the last tree's nodes that ``context`` continues with (its accepted path, as far
        as those nodes were run), drop the others."""
        base, tokens, parents, run = self.tree
        self.tree, path, node = None, [], -1
        if self.cached == context[:base]:
            for token in context[base:]:
                node = next((i for i in range(run) if parents[i] == node and tokens[i] == token), None)
                if node is None:
                    break
                path.append(node)
        self._keep(base, [base + i for i in path])
        self.cached = self.cached[:base] + [tokens[i] for i in path]

    def _run(self, tokens: list[int]) -> torch.Tensor:
        """Logits ``[len(tokens), V]`` after running ``tokens`` causally after the cache."""
        return self._forward(tokens)

    @torch.inference_mode()
    def score(self, tokens: list[int], prompt: int) -> torch.Tensor:
        """Teacher-forced logits ``[len(tokens), V]`` (row t predicts token t+1) as drafting computes them: the
        first ``prompt`` tokens as one prefill, the rest a few tokens per forward. (A quantized copy runs prompts
        on float weights and drafts on its integer kernels: scored in one pass, a text would be all prompt.)"""
        cache = new_cache(self.model)
        rows = [forward(self.model, cache, tokens[:prompt])] if prompt else []
        for start in range(prompt, len(tokens), DECODE_ROWS):
            rows.append(forward(self.model, cache, tokens[start : start + DECODE_ROWS]))
        return torch.cat(rows)

    def propose(self, context: list[int], schedule: Schedule) -> DraftTree:
        rows = [self._sync(context)]  # [V] logits after the root, then after each scored node
        tokens, parents = [], []
        frontier = [-1]  # positions to expand at the current depth
        base = len(context)
        for depth in range(schedule.depths):
            q = torch.stack([rows[p + 1] for p in frontier])  # [F, V]
            # a frontier of one is the latest forward's last row: a compiled step computed its D_q(1)
            certificate = self.cache.certificate if isinstance(self.cache, StaticCache) and len(frontier) == 1 \
                else None
            widths = schedule.widths(depth, q, len(frontier), schedule.budget - len(tokens), certificate)
            level_start = len(tokens)
            for pos, width in zip(frontier, widths):
                if width:
                    tokens += top_tokens(rows[pos + 1], width)
                    parents += [pos] * width
            frontier = list(range(level_start, len(tokens)))
            if not frontier or depth == schedule.depths - 1 or not schedule.may_extend(depth + 1):
                break
            rows += self._score_level(tokens, parents, frontier, base, depth)
        n = len(tokens)
        if is_chain(parents):  # a chain: its entries are the context's if accepted
            self.cached = list(context) + tokens[: cache_length(self.cache) - base]
        else:  # its accepted path's entries are kept at the next proposal
            self.cached, self.tree = list(context), (base, tokens, parents, cache_length(self.cache) - base)
        logits = torch.stack(rows + [torch.full_like(rows[0], float("nan"))] * (1 + n - len(rows)))
        expanded = [True] * len(rows) + [False] * (1 + n - len(rows))
        return DraftTree(tokens, parents, logits, expanded)

    def _score_level(self, tokens, parents, level, base, depth) -> list[torch.Tensor]:
        """Logits after each node of one level (``depth`` in the tree: the root's children are at 0, position
        ``base``), in one forward; earlier levels are in the cache, node i at slot ``base + i``, and each node sees
        the context, its ancestors and itself."""
        if len(level) == 1 and is_chain(parents[: level[0] + 1]):
            return list(self._run([tokens[level[0]]]))  # a chain: a plain causal step
        past = cache_length(self.cache)
        anc = ancestors(parents)
        attend = torch.zeros(len(level), past + len(level), dtype=torch.bool)
        attend[:, :base] = True
        attend[:, base:past] = anc[level][:, : past - base]
        attend[:, past:] = torch.eye(len(level), dtype=torch.bool)
        positions = [base + depth] * len(level)
        return list(self._forward([tokens[i] for i in level], positions, attend))


class HeadDrafter(Drafter):
    """A draft head (:mod:`specert.head`) over the target's hidden states, with its own one-layer KV cache.

    Invariant: ``features`` mirrors the target's KV cache, the context but its last token. Head entry t pairs
    ``features[t]`` with token t+1 and predicts token t+2, so with F states the last entry (F-1) predicts the
    token after the context: the root's children. Tree nodes are entries F, F+1, ... (their input is their
    parent's output g), dropped after each proposal; entries of the context are kept while their state and
    token are unchanged.
    """

    def __init__(self, head, spec: str):
        self.head, self.spec = head, spec
        self.feature_layers = head.cfg.feature_layers
        self._buffer = torch.zeros(0, head.cfg.features)  # grows by doubling; ``features`` is a view of its start
        self.features = self._buffer  # [F, nl * H]
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
            past = n + level_start  # every earlier node is in the cache, node i at entry n + i
            anc = ancestors(parents)
            attend = torch.zeros(len(frontier), past + len(frontier), dtype=torch.bool)
            attend[:, :n] = True
            attend[:, n:past] = anc[frontier][:, :level_start]
            attend[:, past:] = torch.eye(len(frontier), dtype=torch.bool)
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


def layer_skip_view(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The target's first ``layers`` decoder layers, final norm and LM head as a model of its own, sharing every
    weight with the target (no copy)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"layerskip needs a decoder with model.layers; {type(model).__name__} has none")
    total = len(inner.layers)
    if not 1 <= layers < total:
        raise ValueError(f"layerskip:L needs 1 <= L < {total} (the target's layer count), got {layers}")
    return layer_subset(model, list(range(layers)))


def layer_subset(model: torch.nn.Module, keep: list[int], copy_layers: bool = False) -> torch.nn.Module:
    """The model with only the decoder layers ``keep`` (in order), sharing its embedding, final norm and LM head:
    a shallow copy whose layer list is replaced. ``copy_layers`` gives it its own copies of those layers (to train
    or change them), renumbered for the KV cache; otherwise they are the model's own (``keep`` must be a prefix)."""
    inner = model.model
    # NOTE: a shallow copy of a Module shares its `_modules` dict: give each copy its own before replacing children.
    view, inner_view = copy.copy(model), copy.copy(inner)
    view._modules, inner_view._modules = dict(model._modules), dict(inner._modules)
    layers = [copy.deepcopy(inner.layers[i]) if copy_layers else inner.layers[i] for i in keep]
    for j, layer in enumerate(layers):
        if copy_layers and hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = j
    inner_view.layers = torch.nn.ModuleList(layers)
    view.model = inner_view
    view.config = copy.deepcopy(model.config)
    view.config.num_hidden_layers = len(keep)
    if getattr(view.config, "layer_types", None):
        view.config.layer_types = [view.config.layer_types[i] for i in keep]
    view.model.config = view.config
    return view


class NGramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the longest matching suffix (at most ``n`` tokens) in the context,
    most frequent first. A drafted token copied from position j is followed, first, by the token at j + 1: a chain
    copies a whole span, as transformers' prompt lookup and vLLM's n-gram proposer do. No distribution: drafts are
    judged on the token alone.

    What it has instead is the size of the match behind each token: the suffix found for a looked-up token, the
    tokens before the copied one that agree with the context's end for a copied one (at most ``n``). It tells much:
    on Spec-Bench's first 6 prompts per category (the target's greedy outputs, chains of ``ngram:3``), a token
    behind a match of 1 token was the target's 19% of the time, of 2: 44-50%, of 3: 72-76%. A certified chain
    (:class:`~specert.schedules.CertifiedSchedule`) gets it as the position's class, ``min(size, CERTIFIED) - 1``,
    with the token (``guess``), and measures each class's acceptance."""

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


def check_drafter_spec(spec: str) -> None:
    """Raise ``ValueError`` for a malformed drafter spec, before any model is loaded."""
    kind, _, arg = spec.partition(":")
    if kind == "compiled":
        inner = arg.partition(":")[0]
        if inner not in ("int4", "int8", "pruned", "layerskip", "model"):
            raise ValueError(f"drafter spec {spec!r}: compiled: takes a model drafter (int4, int8, pruned[:PATH], "
                             "layerskip:L or model:SPEC), e.g. compiled:int4")
        return check_drafter_spec(arg)
    if spec in ("int4", "int8", "head", "pruned"):
        return
    if kind not in ("model", "layerskip", "ngram", "head", "pruned"):
        raise ValueError(f"unknown drafter spec {spec!r}; use model:SPEC, layerskip:L, ngram:N, head[:PATH], "
                         "pruned[:PATH], int4, int8 or compiled:SPEC")
    if kind in ("layerskip", "ngram") and arg and not arg.isdigit():
        raise ValueError(f"drafter spec {spec!r}: {kind} takes a whole number, e.g. {kind}:3")
    if kind != "ngram" and not arg:
        raise ValueError(f"drafter spec {spec!r}: {kind} needs an argument, e.g. layerskip:8 or model:path")


def drafter_from_spec(spec: str, target: LoadedModel) -> Drafter:
    """Build a drafter from its spec string (see the module docstring) for the given target."""
    check_drafter_spec(spec)
    kind, _, arg = spec.partition(":")
    if kind == "compiled":
        eager = drafter_from_spec(arg, target)
        return ModelDrafter(eager.model, spec, eager.layers_of_target, compiled=True)
    if spec in ("int4", "int8"):
        return ModelDrafter(quantized_copy(target.model, int(spec[3:])), spec, layers_of_target=True)
    if kind == "ngram":
        return NGramDrafter(int(arg or 3))
    if kind == "head":
        from specert.head import load_head, shipped_head

        return HeadDrafter(load_head(arg or shipped_head(target), target), spec)
    if kind == "pruned":
        from specert.pruned import load_pruned, shipped_pruned

        return ModelDrafter(load_pruned(arg or shipped_pruned(target), target), spec)
    if kind == "layerskip":
        return ModelDrafter(layer_skip_view(target.model, int(arg)), spec, layers_of_target=True)
    return model_drafter(load_model(arg), target, spec)


def model_drafter(draft: LoadedModel, target: LoadedModel, spec: str | None = None) -> ModelDrafter:
    """A separate model as drafter; refused unless it scores the target's vocabulary."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"drafter {draft.name!r} has a vocabulary of {draft.vocab_size} tokens but the target {target.name!r} has "
            f"{target.vocab_size}: a drafter must share the target's vocabulary"
        )
    return ModelDrafter(draft.model, spec or f"model:{draft.name}")
