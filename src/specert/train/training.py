"""Training a drafter on the cache, with checkpoints, and the whole `specert distill` run (:func:`run_distill`).

Phase 3 of a work folder (phases 1 and 2, the texts and the cache, are :mod:`specert.train.data`'s): the drafter
trains in its run folder, ``<objective>/`` for a head and ``pruned-<objective>/`` for a pruned drafter, writing
``checkpoint.pt`` every ``save_every`` steps; an interrupted run resumes from it and ends with the same parameters
as an uninterrupted one. Then the drafter's file is written, and ``report.json``: figures of the drafter *as
stored* (float16 weights; a pruned drafter on its int4 grid) on the held-out texts.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specert.decoding.models import LoadedModel, load_model
from specert.drafters.head import DraftHead, HeadConfig, load_head, save_head
from specert.drafters.pruned import PrunedConfig, load_pruned, save_pruned, student
from specert.drafters.storage import fingerprint
from specert.files import save_torch, write_json
from specert.train.config import DistillConfig, default_feature_layers
from specert.train.data import Texts, build_cache, load_cache, prepare
from specert.train.objectives import head_losses, student_losses
from specert.train.pruning import chosen_layers


def new_head(cfg: DistillConfig, loaded: LoadedModel, vocab: list[int], seed: int) -> DraftHead:
    """An untrained head for ``loaded`` over the draft vocabulary ``vocab``, its weights drawn from ``seed``."""
    model = loaded.model
    mc = model.config
    rope = getattr(mc, "rope_parameters", None) or {}
    hc = HeadConfig(hidden=mc.hidden_size, vocab_size=loaded.vocab_size, feature_layers=tuple(cfg.feature_layers),
                    heads=max(1, mc.hidden_size // 64) if mc.hidden_size % 64 == 0 else mc.num_attention_heads,
                    intermediate=mc.intermediate_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
                    target=loaded.name, target_fingerprint=fingerprint(model), trained=cfg.trained_note())
    torch.manual_seed(seed)
    return DraftHead(hc, torch.tensor(vocab), model.get_input_embeddings().weight,
                     model.get_output_embeddings().weight)


def learning_rate(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay from ``cfg.lr`` to 10% of it."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_folder(cfg: DistillConfig, work: Path) -> Path:
    """Where a training run keeps its checkpoint and report: ``<objective>`` (head) or ``pruned-<objective>``."""
    return work / (cfg.objective if cfg.architecture == "head" else f"{cfg.architecture}-{cfg.objective}")


def new_student(cfg: DistillConfig, loaded: LoadedModel, meta: dict, folder: Path):
    """(untrained drafter, its losses function) for ``cfg.architecture``."""
    if cfg.architecture == "head":
        return new_head(cfg, loaded, meta["vocab"], cfg.seed), head_losses
    keep = chosen_layers(cfg, loaded, meta, folder)["keep"]
    torch.manual_seed(cfg.seed)
    return student(loaded.model, tuple(keep), cfg.rank), student_losses


def train(cfg: DistillConfig, loaded: LoadedModel, meta: dict, train_texts: Texts, work: Path,
          progress: bool = True) -> torch.nn.Module:
    """Phase 3: train the drafter; resumes from ``<run folder>/checkpoint.pt`` (its trained parameters and the
    optimiser). Batches depend only on the seed and the step, so a resumed run sees the same batches as an
    uninterrupted one."""
    folder = run_folder(cfg, work)
    folder.mkdir(parents=True, exist_ok=True)
    model, loss_fn = new_student(cfg, loaded, meta, folder)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt, start = folder / "checkpoint.pt", 0
    key = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    key["feature_layers"] = list(key["feature_layers"])
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != key:
            raise ValueError(f"{ckpt} was written with other training options; remove it or use another work folder")
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(state["trained"][name])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    n = len(train_texts.lengths)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
               desc=f"training ({cfg.architecture}, {cfg.objective})", unit="step",
               disable=not progress or start >= cfg.steps)
    model.train()
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        which = torch.randint(n, (min(cfg.batch_size, n),), generator=g).tolist()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        parts = loss_fn(model, train_texts.batch(which), cfg)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(kl=f"{parts['kl/1']:.2f}", agree=f"{parts['agree/1']:.2f}",
                        certified=f"{parts['certified/1']:.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            trained = {name: p.detach().clone() for name, p in zip(names, params)}
            save_torch(ckpt, {"config": key, "step": step + 1, "trained": trained, "optimizer": opt.state_dict()})
    return model.eval()


@torch.no_grad()
def held_out_report(model: torch.nn.Module, texts: Texts, cfg: DistillConfig, batch: int = 8) -> dict:
    """Teacher-forced figures on held-out texts: per depth d (a head's; a pruned drafter has depth 1) the mean KL
    ``kl/d``, agreement with the target's greedy token ``agree/d`` and the certified fraction ``certified/d``,
    each averaged over every scored position; at depth 1 the median KL ``median_kl/1``; and ``positions``."""
    loss_fn = head_losses if isinstance(model, DraftHead) else student_losses
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    kls = []
    for i in range(0, len(texts.lengths), batch):
        which = list(range(i, min(i + batch, len(texts.lengths))))
        parts = loss_fn(model, texts.batch(which), cfg)
        for key in [k for k in parts if k.startswith("count/")]:
            d = key.split("/")[1]
            for name in ("kl", "agree", "certified"):
                sums[f"{name}/{d}"] = sums.get(f"{name}/{d}", 0.0) + parts[f"{name}/{d}"] * parts[key]
                weights[f"{name}/{d}"] = weights.get(f"{name}/{d}", 0) + parts[key]
        kls.append(parts["kl_entries"])
    report = {k: sums[k] / weights[k] for k in sums}
    report["median_kl/1"] = float(torch.cat(kls).median())
    report["positions"] = weights["kl/1"]
    return report


def run_distill(cfg: DistillConfig, work: Path, out: Path, progress: bool = True) -> dict:
    """All three phases; writes the drafter to ``out`` and ``report.json`` to its run folder. Returns the report."""
    cfg.validate()
    loaded = load_model(cfg.target)
    layers = loaded.model.config.num_hidden_layers
    if not cfg.feature_layers:
        cfg.feature_layers = default_feature_layers(layers)
    cfg.feature_layers = tuple(int(i) for i in cfg.feature_layers)
    if cfg.feature_layers[-1] != layers or min(cfg.feature_layers) < 0:
        raise ValueError(f"feature layers must lie in 0..{layers} and end with {layers} (the final states), "
                         f"got {list(cfg.feature_layers)}")
    work = Path(work)
    meta = prepare(cfg, loaded, work, progress)
    build_cache(cfg, loaded, meta, work, progress)
    train_texts, held = load_cache(meta, work)
    model = train(cfg, loaded, meta, train_texts, work, progress)
    folder = run_folder(cfg, work)
    extra = {}
    if cfg.architecture == "head":
        save_head(model, out)
        saved = load_head(out, loaded)  # figures of the head as stored (float16 weights)
    else:
        chosen = chosen_layers(cfg, loaded, meta, folder)
        mc = loaded.model.config
        pc = PrunedConfig(keep=tuple(chosen["keep"]), rank=cfg.rank, layers=mc.num_hidden_layers,
                          vocab_size=loaded.vocab_size, hidden=mc.hidden_size, target=loaded.name,
                          target_fingerprint=fingerprint(loaded.model), trained=cfg.trained_note())
        save_pruned(model, pc, out)
        # figures of the drafter as stored (float16 updates) on its int4 grid, with float activations
        saved = load_pruned(out, loaded, serve=False)
        extra = {"keep": chosen["keep"], "block_influence": chosen["block_influence"]}
    report = {"config": {**asdict(cfg), "feature_layers": list(cfg.feature_layers)}, "drafter": str(out),
              "train_texts": len(train_texts.lengths), "train_tokens": meta["train_tokens"],
              "draft_vocab_coverage": train_texts.vocab_coverage(meta["vocab"]), **extra,
              "held_out": held_out_report(saved, held, cfg)}
    write_json(folder / "report.json", report)
    return report
