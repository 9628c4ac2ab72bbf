"""Model drafters: a causal LM drafting greedily with its own KV cache (a separate small model, the target's own
first layers, or a quantized, pruned or compiled copy of the target)."""

from __future__ import annotations

import copy

import torch

from specert.decoding.drafts import Drafter, DraftTree, is_chain, top_tokens, tree_attention
from specert.decoding.forward import (
    STEP_MODEL_TYPES,
    cache_length,
    can_step,
    forward,
    keep_cache,
    new_cache,
    tree_problem,
)
from specert.decoding.models import LoadedModel
from specert.decoding.quantized import PREFILL_ROWS
from specert.decoding.schedules import Schedule
from specert.decoding.static_cache import StaticCache, compiled_step

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
            raise ValueError(f"drafter {spec!r}: only {', '.join(STEP_MODEL_TYPES)} models without a sliding window "
                             f"can run compiled, not {type(model).__name__}; drop 'compiled:'")
        self.cache = StaticCache(model, step=compiled_step()) if compiled else new_cache(model)
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
        """:func:`~specert.decoding.forward.forward` on the drafter's cache (a static cache runs its own)."""
        if isinstance(self.cache, StaticCache):
            return self.cache.forward(tokens, positions, attend)
        return forward(self.model, self.cache, tokens, positions, attend)

    def _keep(self, keep_from: int, slots: list[int]) -> None:
        """:func:`~specert.decoding.forward.keep_cache` on the drafter's cache."""
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
            q = torch.stack([rows[p + 1] for p in frontier])  # [Fr, V]
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
        problem = tree_problem(self.model)
        if problem:
            raise ValueError(f"drafter {self.spec!r} cannot draft a tree: {problem}")
        assert cache_length(self.cache) == base + level[0], "the cache holds the context and the earlier levels"
        attend = tree_attention(parents, level, base)  # [L, base + level end]
        positions = [base + depth] * len(level)
        return list(self._forward([tokens[i] for i in level], positions, attend))


def model_drafter(draft: LoadedModel, target: LoadedModel, spec: str | None = None) -> ModelDrafter:
    """A separate model as drafter; refused unless it scores the target's vocabulary."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"drafter {draft.name!r} has a vocabulary of {draft.vocab_size} tokens but the target {target.name!r} has "
            f"{target.vocab_size}: a drafter must share the target's vocabulary"
        )
    return ModelDrafter(draft.model, spec or f"model:{draft.name}")


def decoder_layers(model: torch.nn.Module) -> tuple[str, str]:
    """Where ``model`` keeps its decoder layers: (the attribute of its base model, that of the layer list) --
    ``("model", "layers")`` for most families, ``("transformer", "h")`` for GPT-2, GPT-J, Falcon and BLOOM,
    ``("gpt_neox", "layers")`` for GPT-NeoX; ``ValueError`` for a model with no such list."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name in ("layers", "h", "blocks"):
        layers = getattr(inner, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == count:
            return prefix, name
    raise ValueError(f"{type(model).__name__} keeps no list of its {count} decoder layers where specert looks "
                     f"({prefix}.layers, {prefix}.h or {prefix}.blocks)")


def layer_skip_view(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The target's first ``layers`` decoder layers, final norm and LM head as a model of its own, sharing every
    weight with the target (no copy)."""
    prefix, name = decoder_layers(model)
    total = len(getattr(getattr(model, prefix), name))
    if not 1 <= layers < total:
        raise ValueError(f"layerskip:L needs 1 <= L < {total} (the target's layer count), got {layers}")
    return layer_subset(model, list(range(layers)))


def layer_subset(model: torch.nn.Module, keep: list[int], copy_layers: bool = False) -> torch.nn.Module:
    """The model with only the decoder layers ``keep`` (in order), sharing its embedding, final norm and LM head:
    a shallow copy whose layer list is replaced. ``copy_layers`` gives it its own copies of those layers (to train
    or change them), renumbered for the KV cache; otherwise they are the model's own (``keep`` must be a prefix)."""
    prefix, name = decoder_layers(model)
    inner = getattr(model, prefix)
    # NOTE: a shallow copy of a Module shares its `_modules` dict: give each copy its own before replacing children.
    view, inner_view = copy.copy(model), copy.copy(inner)
    view._modules, inner_view._modules = dict(model._modules), dict(inner._modules)
    layers = [copy.deepcopy(getattr(inner, name)[i]) if copy_layers else getattr(inner, name)[i] for i in keep]
    for j, layer in enumerate(layers):
        for module in layer.modules() if copy_layers else ():
            if isinstance(getattr(module, "layer_idx", None), int):  # the slot of its keys and values in a cache
                module.layer_idx = j
    setattr(inner_view, name, torch.nn.ModuleList(layers))
    setattr(view, prefix, inner_view)
    view.config = copy.deepcopy(model.config)
    view.config.num_hidden_layers = len(keep)
    if getattr(view.config, "layer_types", None):
        view.config.layer_types = [view.config.layer_types[i] for i in keep]
    inner_view.config = view.config
    return view
