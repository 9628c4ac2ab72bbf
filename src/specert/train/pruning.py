"""Which of the target's layers a pruned drafter (:mod:`specert.drafters.pruned`) keeps.

ShortGPT (Men et al. 2024, arXiv 2403.03853): the *block influence* of decoder layer i is how much it turns its
input, averaged over positions t of sample text::

    BI_i = 1 - E_t cos(x_i,t, x_i+1,t)        (x_i: the residual stream entering layer i)

and the ``drop`` layers of lowest BI are removed. A layer that adds nothing to the residual stream has BI = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specert.decoding.models import LoadedModel
from specert.files import write_json
from specert.train.config import DistillConfig

INFLUENCE_TEXTS = 16  # training texts the block influence is measured on


@torch.no_grad()
def block_influence(model: nn.Module, texts: list[list[int]]) -> torch.Tensor:
    """BI_i of every decoder layer (module docstring), averaged over the positions of ``texts``: ``[L]``,
    float64."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)  # [L]
    count = 0

    def hook(i):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]  # [1, T, H]: the layer's input
            y = out[0] if isinstance(out, tuple) else out  # [1, T, H]: its output
            sums[i] += (1 - F.cosine_similarity(x.double(), y.double(), dim=-1)).sum()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in texts:
            model(torch.tensor([ids]), use_cache=False)
            count += len(ids)
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


def layers_to_keep(influence: torch.Tensor, drop: int) -> tuple[int, ...]:
    """All layers but the ``drop`` of lowest block influence ``influence`` ``[L]``, in order."""
    if not 1 <= drop < len(influence):
        raise ValueError(f"drop must be between 1 and {len(influence) - 1} (the target has {len(influence)} layers), "
                         f"got {drop}")
    gone = set(influence.argsort()[:drop].tolist())
    return tuple(i for i in range(len(influence)) if i not in gone)


def chosen_layers(cfg: DistillConfig, loaded: LoadedModel, meta: dict, folder: Path,
                  texts: int = INFLUENCE_TEXTS) -> dict:
    """The layers the pruned drafter keeps (``keep``, with ``drop`` and every layer's ``block_influence``), from
    the block influence on the first ``texts`` training texts of ``meta``; measured once per run folder
    (``layers.json``), again only when ``cfg.drop`` changes."""
    path = folder / "layers.json"
    if path.is_file():
        chosen = json.loads(path.read_text())
        if chosen["drop"] == cfg.drop:
            return chosen
    influence = block_influence(loaded.model, meta["train"][:texts])
    chosen = {"drop": cfg.drop, "keep": list(layers_to_keep(influence, cfg.drop)),
              "block_influence": [round(float(b), 5) for b in influence]}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, chosen, indent=None)
    return chosen
