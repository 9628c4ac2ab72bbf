"""Drafters: cheap proposers of the tokens a target verifies, behind one small interface
(:class:`~specert.decoding.drafts.Drafter`), one module per kind; :func:`drafter_from_spec` builds one from its spec.

A drafter proposes a *draft tree* after a context: the root is the context's end, and each node's children are the
drafter's top-w tokens after the path to it, w given by a :mod:`~specert.decoding.schedules` schedule (fixed per
depth, or decided from the drafter's own certificate). A chain of k tokens is the schedule ``[1] * k``. With the
tree the drafter returns its logits at every expanded position (the distribution q its children were drawn from) or, for
drafters with no distribution (n-gram lookup), ``None``: those drafts are judged by the rule on the token alone
(for strict greedy: exact match).

The drafter specs, one per kind, are listed in :mod:`specert.drafters.spec` (``DRAFTER_GRAMMAR``).
"""

from __future__ import annotations

from specert.decoding.drafts import Drafter, DraftTree
from specert.drafters.head import HeadDrafter
from specert.drafters.model import ModelDrafter, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.spec import check_drafter_spec, drafter_from_spec

__all__ = ["DraftTree", "Drafter", "HeadDrafter", "ModelDrafter", "NGramDrafter", "check_drafter_spec",
           "drafter_from_spec", "model_drafter"]
