"""`specert eval`: the paper's study (THEORY.md section 8) on real prompts, extended with real drafters, wall-clock
speed and the quality cost of relaxed rules.

Three phases, each checkpointed in the output folder so that an interrupted run resumes where it stopped, with
nothing recomputed and nothing duplicated (a part is written whole, atomically, or not at all):

1. ``steps/part-NNNNN.parquet``: greedy decoding of the target over the prompts, batched across prompts; at every
   step the target's statistics and the certificate of every rule.
2. ``drafters/<drafter>/part-NNNNN.parquet``: for each drafter, teacher-forced along the target's greedy text:
   KL(p || q), the drafter-side certificate and, per rule, whether the step is certified and accepted.
3. ``decode/<name>/prompt-NNNNN.json``, then ``decode/<name>.json``: real speculative decoding per (drafter, rule)
   and the target alone, batch 1, side by side (:func:`~specert.study.side_by_side.decode_side_by_side`): tokens/s,
   mean acceptance length, the live soundness counter, agreement with the target's greedy output and the target's
   NLL of the text.

Every input is checked before any model is loaded or any file is written, and the folder's ``config.json`` records
the run's settings only once its inputs are known good: a run refused leaves its folder as it was.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from specert.decoding.model_specs import ModelSpecInfo, check_model_spec, load_with_progress, waiting
from specert.drafters.spec import drafter_from_spec
from specert.files import write_json, write_parquet
from specert.served.client import ServedModel, is_served
from specert.study.inputs import check_draft_length, check_drafter, check_length, check_output_folder, check_rules
from specert.study.prompts import SHAREGPT, Prompt, load_prompts
from specert.study.served import (
    check_served_drafter,
    encode_served,
    served_drafter,
    served_drafter_part,
    served_target_part,
    served_topk,
    vocab_size_of,
)
from specert.study.side_by_side import DecodeJob, decode_side_by_side
from specert.study.teacher_forced import drafter_part, prompt_batches, target_part
from specert.theory.rules import STANDARD_RULES, rule


@dataclass
class EvalConfig:
    target: str = "smollm2-135m"
    prompts: str = SHAREGPT
    num_prompts: int = 32
    steps: int = 64
    rules: tuple[str, ...] = STANDARD_RULES
    drafters: tuple[str, ...] = ()
    decode_rules: tuple[str, ...] = ("greedy", "typical:0.09,0.3")
    decode_prompts: int = 8
    k: int = 0  # chain length of the real decoding runs; 0: each drafter's own (its ``default_k``)
    batch_size: int = 16
    max_prompt_tokens: int = 512
    seed: int = 0
    # a served target (``target`` one or more server URLs): study/served.py
    served_model: str = ""  # the served model's name (default: the server's only one)
    logprobs: int = 20  # K, the most probable tokens asked per step (0: every token, needs --max-logprobs -1)
    vocab_size: int = 0  # the served model's vocabulary size (default: read from the config it was loaded from)
    concurrency: int = 4  # requests in flight at once
    timeout: float = 600.0  # seconds per request before it is retried
    retries: int = 4  # attempts after the first on transient failures

    def validate(self) -> ModelSpecInfo:
        """Check every option and the target's spec without loading it (:mod:`specert.decoding.model_specs`):
        numbers, rules and drafters against the target's vocabulary, layers and context where its header says
        them. Normalises the rule specs; returns what was read of the target."""
        if self.k < 0:
            raise ValueError(f"k must be >= 0 (0: each drafter's own draft length), got {self.k}")
        for name in ("num_prompts", "steps", "batch_size", "max_prompt_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("decode_prompts", "logprobs", "vocab_size", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout}")
        if not self.rules or not self.decode_rules and self.drafters and self.decode_prompts:
            raise ValueError("give at least one rule (and one decode rule for the real decoding runs)")
        target = check_model_spec(self.target, served_ok=True)
        self.rules = tuple(str(r) for r in check_rules(self.rules, target))
        self.decode_rules = tuple(str(r) for r in check_rules(self.decode_rules, target))
        for d in self.drafters:
            if is_served(self.target):
                check_served_drafter(d)
                if d.startswith("model:"):
                    check_drafter(d, target)
            else:
                check_drafter(d, target)
        check_length(self.steps + 1, target, f"--steps {self.steps}")
        if self.decode_prompts and self.drafters and self.k:
            check_draft_length(self.k, self.steps, target, f"--k {self.k}")
        return target


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", spec)


def _check_config(out: Path, cfg: EvalConfig) -> dict:
    """Refuse an output folder that cannot take this run: not a folder or not writable, holding other files, or a
    run with other settings. Writes nothing; returns the settings to record."""
    check_output_folder(out, "output folder")
    path = out / "config.json"
    mine = asdict(cfg)
    mine = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mine.items()}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} does not parse ({type(e).__name__}); give another --out") from None
        # more drafters or decode rules extend a run, and how requests run changes no result; anything else does
        keys = [k for k in mine if k not in ("drafters", "decode_rules", "decode_prompts", "concurrency", "timeout",
                                             "retries")]
        diff = [k for k in keys if not isinstance(theirs, dict) or theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}); resume with the same settings, "
                "or give another --out"
            )
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"{out} holds other files but no run (config.json); give a new or empty folder as --out")
    return mine


def _check_or_write_config(out: Path, cfg: EvalConfig) -> None:
    """Record the run's settings in ``out/config.json``, once every input is known good (:func:`_check_config`
    first)."""
    mine = _check_config(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", mine)


def run_eval(cfg: EvalConfig, out: Path, progress: bool = True) -> Path:
    """Run (or resume) an evaluation into ``out`` and write its report; returns the report folder.

    Every input is checked before any model is loaded or any file written (the options, the target's and the
    drafters' specs, the output folder, the prompts); the folder records the run's settings once the target and the
    drafters are loaded. ``progress``: bars and waits shown on stderr (a terminal only).
    """
    from specert.study.report import write_report

    cfg.validate()
    out = Path(out)
    _check_config(out, cfg)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    if is_served(cfg.target):
        return _run_served(cfg, out, prompts, progress)
    loaded = load_with_progress(cfg.target, progress)
    encoded, batches, dropped = prompt_batches(loaded, prompts, cfg)
    if not batches:
        raise ValueError(f"no prompt fits: all {len(prompts)} are longer than {cfg.max_prompt_tokens} tokens")
    drafters = {}
    for spec in cfg.drafters:  # before the settings are recorded: a drafter refused leaves the folder as it was
        with waiting(f"preparing drafter {spec}", progress and not spec.startswith("compiled:")):
            drafters[spec] = drafter_from_spec(spec, loaded)
    _check_or_write_config(out, cfg)

    # Phase 1: target steps, one part per batch of prompts.
    steps_dir = out / "steps"
    steps_dir.mkdir(exist_ok=True)
    todo = [b for b in range(len(batches)) if not (steps_dir / f"part-{b:05d}.parquet").exists()]
    total = sum(len(batches[b]) for b in todo) * cfg.steps
    with tqdm(total=total, desc="target steps", unit="step", disable=not progress or not todo) as bar:
        for b in todo:
            table = target_part(loaded, prompts, encoded, batches[b], cfg)
            write_parquet(steps_dir / f"part-{b:05d}.parquet", table)
            bar.update(len(batches[b]) * cfg.steps)
    steps = pq.read_table(steps_dir)
    greedy: dict[int, list[int]] = {i: [] for i in encoded}
    for i, t in zip(steps.column("prompt_index").to_pylist(), steps.column("token").to_pylist()):
        greedy[i].append(t)  # parts are in step order within each prompt

    # Phase 2: drafters teacher-forced along the greedy text.
    for spec, drafter in drafters.items():
        ddir = out / "drafters" / safe_name(spec)
        ddir.mkdir(parents=True, exist_ok=True)
        todo = [b for b in range(len(batches)) if not (ddir / f"part-{b:05d}.parquet").exists()]
        for b in tqdm(todo, desc=f"drafter {spec}", unit="batch", disable=not progress or not todo):
            write_parquet(ddir / f"part-{b:05d}.parquet",
                          drafter_part(loaded, spec, drafter, encoded, greedy, batches[b], cfg))

    # Phase 3: real decoding, batch 1, side by side, on the first prompts (in sample order).
    chosen = sorted(encoded)[: cfg.decode_prompts]
    ddir = out / "decode"
    ddir.mkdir(exist_ok=True)
    jobs = [DecodeJob("target")] if chosen else []
    jobs += [DecodeJob(f"{safe_name(d)}__{safe_name(r)}", drafters[d], r, {"k": cfg.k} if cfg.k else {})
             for d in cfg.drafters for r in cfg.decode_rules if chosen]
    if any(not (ddir / f"{job.name}.json").exists() for job in jobs):
        for name, result in decode_side_by_side(loaded, jobs, encoded, greedy, chosen, cfg.steps, ddir, progress,
                                                cfg.seed).items():
            write_json(ddir / f"{name}.json", result)

    info = {"prompts_sampled": len(prompts), "prompts_used": len(encoded), "prompts_dropped": dropped,
            "vocab_size": loaded.vocab_size}
    return write_report(out, cfg, info, [job.name for job in jobs])


def _run_served(cfg: EvalConfig, out: Path, prompts: list[Prompt], progress: bool) -> Path:
    """:func:`run_eval` on a served target (:mod:`specert.study.served`): phases 1 and 2, no real decoding."""
    from specert.study.report import write_report

    target = ServedModel(cfg.target, cfg.served_model or None, cfg.concurrency, cfg.timeout, cfg.retries)
    entry = target.check()
    vocab = vocab_size_of(entry, cfg.vocab_size)
    k = cfg.logprobs or vocab
    if k > vocab:
        raise ValueError(f"--logprobs {k} exceeds the served model's vocabulary of {vocab} tokens")
    for rule_spec in cfg.rules:
        rule(rule_spec).validate(vocab)
    # one short request asks what the run will ask (K log-probabilities, token ids within the vocabulary) before
    # the run folder records its settings
    probe = target.greedy(target.tokenize([{"role": "user", "content": "Hi"}]), 1, k)
    served_topk(probe.top_logprobs, probe.top_ids, vocab)
    _check_or_write_config(out, cfg)
    encoded, dropped = encode_served(target, prompts, cfg.steps, cfg.max_prompt_tokens,
                                     int(entry.get("max_model_len") or 2**31))
    if not encoded:
        raise ValueError(f"no prompt fits: all {len(prompts)} are longer than {cfg.max_prompt_tokens} tokens")
    order = sorted(encoded)
    batches = [order[j : j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]

    # Phase 1: the target's greedy text and top K, one part per batch of prompts.
    steps_dir, top_dir = out / "steps", out / "topk"
    steps_dir.mkdir(exist_ok=True)
    top_dir.mkdir(exist_ok=True)
    todo = [b for b in range(len(batches)) if not (steps_dir / f"part-{b:05d}.parquet").exists()]
    total = sum(len(batches[b]) for b in todo) * cfg.steps
    with tqdm(total=total, desc="target steps", unit="step", disable=not progress or not todo) as bar:
        for b in todo:
            table, top = served_target_part(target, prompts, encoded, batches[b], cfg.steps, k, vocab, cfg.rules, bar)
            write_parquet(top_dir / f"part-{b:05d}.parquet", top)
            write_parquet(steps_dir / f"part-{b:05d}.parquet", table)
    steps = pq.read_table(steps_dir)
    greedy: dict[int, list[int]] = {i: [] for i in encoded}
    for i, t in zip(steps.column("prompt_index").to_pylist(), steps.column("token").to_pylist()):
        greedy[i].append(t)

    # Phase 2: drafters teacher-forced along the greedy text, judged against the target's top K.
    for spec in cfg.drafters:
        ddir = out / "drafters" / safe_name(spec)
        ddir.mkdir(parents=True, exist_ok=True)
        todo = [b for b in range(len(batches)) if not (ddir / f"part-{b:05d}.parquet").exists()]
        if not todo:
            continue
        drafter = served_drafter(spec, target, vocab, cfg.concurrency, cfg.timeout, cfg.retries)
        for b in tqdm(todo, desc=f"drafter {spec}", unit="batch", disable=not progress):
            top = pq.read_table(top_dir / f"part-{b:05d}.parquet")
            write_parquet(ddir / f"part-{b:05d}.parquet",
                          served_drafter_part(drafter, encoded, greedy, top, batches[b], k, vocab, cfg.rules))

    info = {"prompts_sampled": len(prompts), "prompts_used": len(encoded), "prompts_dropped": dropped,
            "vocab_size": vocab, "served": {"model": target.model, "logprobs": k, "servers": target.bases}}
    target.close()
    return write_report(out, cfg, info, [])
