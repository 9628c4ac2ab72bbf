"""Drafters: cheap proposers of the tokens a target verifies, behind one small interface
(:class:`~specert.decoding.drafts.Drafter`), one module per kind; :func:`drafter_from_spec` builds one from its spec.

A drafter proposes a *draft tree* after a context: the root is the context's end, and each node's children are the
drafter's top-w tokens after the path to it, w given by a :mod:`~specert.decoding.schedules` schedule (fixed per
depth, or
decided from the drafter's own certificate). A chain of k tokens is the schedule ``[1] * k``. With the tree the
drafter returns its logits at every expanded position (the distribution q its children were drawn from) or, for
drafters with no distribution (n-gram lookup), ``None``: those drafts are judged by the rule on the token alone
(for strict greedy: exact match).

================  =======================================================================================
spec              drafter
================  =======================================================================================
``model:SPEC``    a separate small causal LM (any model spec of :mod:`specert.decoding.models`), same vocabulary
``layerskip:L``   the target's first L layers with its final norm and LM head, sharing its weights
``ngram:N``       prompt lookup: continuations of the longest suffix (N tokens at most) seen in the context
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

from specert.decoding.drafts import Drafter, DraftTree
from specert.drafters.head import HeadDrafter
from specert.drafters.model import ModelDrafter, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.spec import check_drafter_spec, drafter_from_spec

__all__ = ["DraftTree", "Drafter", "HeadDrafter", "ModelDrafter", "NGramDrafter", "check_drafter_spec",
           "drafter_from_spec", "model_drafter"]
