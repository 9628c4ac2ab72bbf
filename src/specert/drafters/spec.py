"""Drafter specs: parsing a drafter's spec string and building the drafter it names for a target.

================  =======================================================================================
spec              drafter
================  =======================================================================================
``model:SPEC``    a separate small causal LM (any model spec of :mod:`specert.decoding.models`), same vocabulary
``layerskip:L``   the target's first L layers with its final norm and LM head, sharing its weights
``ngram:N``       prompt lookup: continuations of the longest suffix (N tokens at most) seen in the context
``vllm-ngram``    ``vllm-ngram[:MIN,MAX]``: vLLM's n-gram proposer token for token (:mod:`specert.drafters.vllm_ngram`),
                  the tokens after the earliest occurrence of the longest suffix of MIN..MAX tokens (default 5,5)
``int4``          the target with 4-bit weights (groups of 32; exact for Q4_1 GGUF layers), LM head int8
``int8``          the target with int8 weights, one scale per row (:mod:`specert.decoding.quantized`)
``head[:PATH]``   a draft head trained by ``specert distill`` (:mod:`specert.drafters.head`) reading the target's hidden
                  states; without PATH the head shipped for the embedded default
``pruned[:PATH]`` the target with its least useful layers removed and healed by ``specert distill --architecture
                  pruned`` (:mod:`specert.drafters.pruned`), int4; without PATH the one shipped for the embedded default
``compiled:SPEC`` the model drafter SPEC (``int4``, ``int8``, ``pruned``, ``layerskip:L``, ``model:...``) with its
                  step compiled by ``torch.compile`` over a static KV cache (:mod:`specert.decoding.static_cache`)
================  =======================================================================================
"""

from __future__ import annotations

from specert.decoding.drafts import Drafter
from specert.decoding.forward import STEP_MODEL_TYPES, can_step, rollback_problem
from specert.decoding.models import LoadedModel, load_model
from specert.decoding.quantized import quantized_copy
from specert.drafters.head import HeadDrafter, load_head, shipped_head
from specert.drafters.model import ModelDrafter, layer_skip_view, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.pruned import load_pruned, shipped_pruned
from specert.drafters.vllm_ngram import DEFAULT_LOOKUP, VllmNgramDrafter, check_lookup

# The drafter specs in one line (for help texts and errors).
DRAFTER_GRAMMAR = ("int4, int8 (the target with quantized weights), layerskip:L (its first L layers), ngram:N, "
                   "vllm-ngram[:MIN,MAX] (vLLM's n-gram proposer), model:SPEC (a separate model), head[:PATH], "
                   "pruned[:PATH] (trained drafters), compiled:SPEC (a model drafter's step compiled by "
                   "torch.compile).")


def check_drafter_spec(spec: str) -> None:
    """Raise ``ValueError`` for a malformed drafter spec, before any model is loaded."""
    kind, _, arg = spec.partition(":")
    if kind == "compiled":
        inner = arg.partition(":")[0]
        if inner not in ("int4", "int8", "pruned", "layerskip", "model"):
            raise ValueError(f"drafter spec {spec!r}: compiled: takes a model drafter (int4, int8, pruned[:PATH], "
                             "layerskip:L or model:SPEC), e.g. compiled:int4")
        return check_drafter_spec(arg)
    if spec in ("int4", "int8", "head", "pruned", "vllm-ngram"):
        return
    if kind not in ("model", "layerskip", "ngram", "vllm-ngram", "head", "pruned"):
        raise ValueError(f"unknown drafter spec {spec!r}; use model:SPEC, layerskip:L, ngram:N, vllm-ngram[:MIN,MAX], "
                         "head[:PATH], pruned[:PATH], int4, int8 or compiled:SPEC")
    if kind == "vllm-ngram":
        return check_lookup(*_lookup_bounds(spec))
    if kind in ("layerskip", "ngram") and arg and not arg.isdigit():
        raise ValueError(f"drafter spec {spec!r}: {kind} takes a whole number, e.g. {kind}:3")
    if kind != "ngram" and not arg:
        raise ValueError(f"drafter spec {spec!r}: {kind} needs an argument, e.g. layerskip:8 or model:path")


# Why a model drafter's step cannot be compiled on a target outside the fast path's families.
COMPILED_FAMILIES = (f"only {', '.join(STEP_MODEL_TYPES)} models without a sliding window can run compiled; "
                     "drop 'compiled:'")


def architecture_problem(spec: str, architecture: str | None) -> str | None:
    """Why drafter ``spec`` cannot run on a target of ``architecture`` (a GGUF header's ``general.architecture`` or
    a config's ``model_type``), known before either is loaded; None if it may (:func:`drafter_from_spec` checks the
    loaded target again). ``compiled:`` over the target's own layers needs a :func:`can_step` family."""
    kind, _, arg = spec.partition(":")
    if kind == "compiled" and not arg.startswith("model:") and architecture and architecture not in STEP_MODEL_TYPES:
        return COMPILED_FAMILIES
    return None


def _lookup_bounds(spec: str) -> tuple[int, int]:
    """(MIN, MAX) of ``vllm-ngram[:MIN,MAX]`` (vLLM's 5, 5 without them)."""
    arg = spec.partition(":")[2]
    if not arg:
        return DEFAULT_LOOKUP, DEFAULT_LOOKUP
    bounds = arg.split(",")
    if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
        raise ValueError(f"drafter spec {spec!r}: vllm-ngram takes two whole numbers MIN,MAX (vLLM's prompt_lookup_min "
                         "and prompt_lookup_max), e.g. vllm-ngram:2,4")
    return int(bounds[0]), int(bounds[1])


def drafter_from_spec(spec: str, target: LoadedModel) -> Drafter:
    """Build a drafter from its spec string (see the module docstring) for the given target."""
    check_drafter_spec(spec)
    kind, _, arg = spec.partition(":")
    problem = rollback_problem(target.model)
    if problem is None and kind == "compiled" and not arg.startswith("model:") and not can_step(target.model):
        problem = COMPILED_FAMILIES
    if problem:
        raise ValueError(f"drafter {spec!r} cannot run on {target.name!r} ({type(target.model).__name__}): {problem}")
    # NOTE: each drafter's default draft shape is among the fastest on the embedded model (`python
    # benchmarks/adaptive.py --drafter SPEC` ranks the shapes): a compiled step drafts cheaply enough for the
    # certified chain's long runs, a quantized copy's eager token costs enough that chains of 3 beat 4.
    if kind == "compiled":
        eager = drafter_from_spec(arg, target)
        drafter = ModelDrafter(eager.model, spec, eager.layers_of_target, compiled=True)
        drafter.default_k = "auto"
        return drafter
    if spec in ("int4", "int8"):
        drafter = ModelDrafter(quantized_copy(target.model, int(spec[3:])), spec, layers_of_target=True)
        drafter.default_k = 3
        return drafter
    if kind == "ngram":
        return NGramDrafter(int(arg or 3))
    if kind == "vllm-ngram":
        return VllmNgramDrafter(*_lookup_bounds(spec))
    if kind == "head":
        return HeadDrafter(load_head(arg or shipped_head(target), target), spec)
    if kind == "pruned":
        return ModelDrafter(load_pruned(arg or shipped_pruned(target), target), spec)
    if kind == "layerskip":
        return ModelDrafter(layer_skip_view(target.model, int(arg)), spec, layers_of_target=True)
    return model_drafter(load_model(arg), target, spec)
