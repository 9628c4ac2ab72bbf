"""`specert eval`: the paper's study (THEORY.md section 8) on real prompts, extended with real drafters, wall-clock
speed and the quality cost of relaxed rules.

Three phases, each checkpointed in the output folder so that an interrupted run resumes where it stopped, with
nothing recomputed and nothing duplicated (a part is written whole, atomically, or not at all):

1. ``steps/part-NNNNN.parquet``: greedy decoding of the target over the prompts, batched across prompts; at every
   step the target's statistics and the certificate of every rule.
2. ``drafters/<drafter>/part-NNNNN.parquet``: for each drafter, teacher-forced along the target's greedy text:
   KL(p || q), the drafter-side certificate and, per rule, whether the step is certified and accepted.
3. ``decode/<name>/prompt-NNNNN.json``, then ``decode/<name>.json``: real speculative decoding per (drafter, rule)
   and the target alone, batch 1, side by side (:func:`decode_side_by_side`): tokens/s, mean acceptance length, the
   live soundness counter, agreement with the target's greedy output and the target's NLL of the text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from specert.acceptance import accepts, tokens_accepted
from specert.certificates import certificates, drafter_certificate
from specert.decoding import generate
from specert.divergence import kl
from specert.drafters import Drafter, NGramDrafter, check_drafter_spec, drafter_from_spec
from specert.models import LoadedModel, batched_greedy, encode_prompt, load_model
from specert.prompts import SHAREGPT, Prompt, load_prompts
from specert.rules import STANDARD_RULES, rule
from specert.schedules import History
from specert.trace import SpecDecodeMetrics


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
    k: int = 4
    batch_size: int = 16
    max_prompt_tokens: int = 512
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_prompts", "steps", "k", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.decode_prompts < 0:
            raise ValueError(f"decode-prompts must be >= 0, got {self.decode_prompts}")
        self.rules = tuple(str(rule(r)) for r in self.rules)
        self.decode_rules = tuple(str(rule(r)) for r in self.decode_rules)
        for d in self.drafters:
            check_drafter_spec(d)


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", spec)


def _check_or_write_config(out: Path, cfg: EvalConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    mine = asdict(cfg)
    mine = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mine.items()}
    if path.exists():
        theirs = json.loads(path.read_text())
        # more drafters or decode rules extend a run; anything else changes what was computed
        keys = [k for k in mine if k not in ("drafters", "decode_rules", "decode_prompts")]
        diff = [k for k in keys if theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}); resume with the same settings, "
                "or give another --out"
            )
    _atomic_json(mine, path)


def prompt_batches(loaded: LoadedModel, prompts: list[Prompt], cfg: EvalConfig):
    """Token ids per prompt (too-long prompts dropped) and batches of prompt indices of similar length."""
    encoded, dropped = {}, 0
    for i, p in enumerate(prompts):
        ids = encode_prompt(loaded, p.text) if len(p.text) < 20 * cfg.max_prompt_tokens else None
        if ids is None or len(ids) > cfg.max_prompt_tokens or len(ids) + cfg.steps > loaded.context_length:
            dropped += 1
            continue
        encoded[i] = ids
    order = sorted(encoded, key=lambda i: (len(encoded[i]), i))
    batches = [order[j : j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]
    return encoded, batches, dropped


def _target_part(loaded, prompts, encoded, batch, cfg) -> pa.Table:
    """Phase 1 for one batch of prompts: greedy decoding with per-step statistics and certificates."""
    cols: dict[str, list] = {k: [] for k in ("prompt_index", "prompt_id", "category", "step", "token", "p_top1",
                                             "top10_mass", "margin", "entropy")}
    certs: dict[str, list] = {r: [] for r in cfg.rules}
    for step, logits, tokens, alive in batched_greedy(loaded.model, [encoded[i] for i in batch], cfg.steps,
                                                      loaded.eos_token_ids):
        live = alive.nonzero()[:, 0]
        rows = logits[live]  # [b, V]
        logp = torch.log_softmax(rows.double(), -1)
        top = torch.topk(logp, 10, -1).values.exp()  # [b, 10]
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        for r, c in certificates(rows, cfg.rules).items():
            certs[r] += c.tolist()
        for j, b in enumerate(live.tolist()):
            i = batch[b]
            cols["prompt_index"].append(i)
            cols["prompt_id"].append(prompts[i].id)
            cols["category"].append(prompts[i].category)
            cols["step"].append(step)
            cols["token"].append(int(tokens[b]))
            cols["p_top1"].append(float(top[j, 0]))
            cols["top10_mass"].append(float(top[j].sum()))
            cols["margin"].append(float(top[j, 0] - top[j, 1]))
            cols["entropy"].append(float(entropy[j]))
    table = pa.table(cols)
    for r, values in certs.items():
        table = table.append_column(f"cert:{r}", pa.array(values, pa.float64()))
    return table


@torch.inference_mode()
def drafter_part(loaded, drafter_spec, drafter, encoded, greedy, batch, cfg) -> pa.Table:
    """Phase 2 for one drafter and one batch: teacher-forced q along the target's greedy text."""
    cols: dict[str, list] = {"prompt_index": [], "step": [], "draft_token": [], "kl": [], "drafter_certificate": []}
    per_rule: dict[str, list] = {}
    for i in batch:
        gen = greedy[i]
        if not gen:
            continue
        seq = encoded[i] + gen
        n = len(encoded[i])
        full = torch.tensor([seq[:-1]])
        layers = drafter.feature_layers
        out = loaded.model(full, output_hidden_states=bool(layers))
        p = out.logits[0, n - 1 :].double()  # [T, V]: p at every generated step
        if isinstance(drafter, NGramDrafter):
            draft_tokens = torch.tensor([(drafter.continuations(torch.tensor(seq[: n + t]))[1] or [(-1, -1)])[0][0]
                                         for t in range(len(gen))])
            has = draft_tokens >= 0
            divergence = torch.full((len(gen),), float("nan"), dtype=torch.float64)
            d_q = divergence.clone()
            certs = certificates(p, cfg.rules)
            for r in cfg.rules:
                ok = torch.zeros(len(gen), dtype=torch.bool)
                if has.any():
                    ok[has] = tokens_accepted(p[has], draft_tokens[has], r)
                per_rule.setdefault(f"accepted:{r}", []).extend(ok.tolist())
                per_rule.setdefault(f"certified:{r}", []).extend([False] * len(gen))
                per_rule.setdefault(f"cert:{r}", []).extend(certs[r].tolist())
        else:
            if layers:  # a head over the target's states
                states = torch.cat([out.hidden_states[j][0] for j in layers], -1)  # [T, nl * H]
                q = drafter.score(seq[:-1], states)[n - 1 :].double()
            else:
                q = drafter.score(seq[:-1], n - 1)[n - 1 :].double()  # [T, V]
            draft_tokens = q.argmax(-1)
            divergence, d_q = kl(p, q), drafter_certificate(q, 1)
            certs = certificates(p, cfg.rules)
            for r in cfg.rules:
                per_rule.setdefault(f"accepted:{r}", []).extend(accepts(p, q, r).tolist())
                per_rule.setdefault(f"certified:{r}", []).extend((divergence < certs[r]).tolist())
                per_rule.setdefault(f"cert:{r}", []).extend(certs[r].tolist())
        cols["prompt_index"] += [i] * len(gen)
        cols["step"] += list(range(len(gen)))
        cols["draft_token"] += draft_tokens.tolist()
        cols["kl"] += divergence.tolist()
        cols["drafter_certificate"] += d_q.tolist()
    table = pa.table(cols)
    for name, values in per_rule.items():
        table = table.append_column(name, pa.array(values))
    return table.append_column("drafter", pa.array([drafter_spec] * len(table), pa.string()))


def nll(loaded, prompt_ids, tokens) -> float:
    """Mean negative log-likelihood (nats/token) of ``tokens`` after ``prompt_ids`` under the target."""
    if not tokens:
        return float("nan")
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + tokens[:-1]])).logits[0, len(prompt_ids) - 1 :].double()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return float(-logp.mean())


@dataclass
class DecodeJob:
    """A real decoding run of the side-by-side phase: a drafter (None: the target alone), a rule and a draft shape
    (``{"k": ...}`` or ``{"tree": ...}``, as :func:`~specert.decoding.generate` takes them)."""

    name: str
    drafter: Drafter | None = None
    rule: str = "greedy"
    shape: dict = field(default_factory=dict)


def decode_prompt(loaded: LoadedModel, job: DecodeJob, ids: list[int], ref: list[int], steps: int) -> dict:
    """One prompt's real decoding, batch 1, by ``job``: its counts (:class:`~specert.trace.SpecDecodeMetrics`), its
    agreement with ``ref`` (the target's greedy text) and the target's NLL of both texts."""
    gen = generate(loaded, ids, job.drafter, job.rule, max_new_tokens=steps, trace=job.drafter is not None,
                   **(job.shape if job.drafter is not None else {}))
    metrics = SpecDecodeMetrics()
    metrics.observe(gen)
    n = min(len(ref), len(gen.tokens))
    return {"metrics": asdict(metrics), "agree": sum(a == b for a, b in zip(gen.tokens[:n], ref[:n])),
            "total": max(len(ref), len(gen.tokens)), "nll": nll(loaded, ids, gen.tokens),
            "nll_greedy": nll(loaded, ids, ref)}


def combine(job: DecodeJob, parts: list[dict]) -> dict:
    """A job's result over its prompts (:func:`decode_prompt`'s): speed, acceptance, the live soundness counter,
    agreement and mean NLLs."""
    metrics = SpecDecodeMetrics()
    for part in parts:
        metrics.add(part["metrics"])
    agree, total = sum(p["agree"] for p in parts), sum(p["total"] for p in parts)
    out = metrics.as_dict()
    out.update(drafter=job.drafter.spec if job.drafter else None, rule=job.rule if job.drafter else None,
               agreement=agree / total if total else float("nan"),
               nll=float(np.nanmean([p["nll"] for p in parts])),
               nll_greedy=float(np.nanmean([p["nll_greedy"] for p in parts])), prompts=len(parts))
    return out


def decode_side_by_side(loaded: LoadedModel, jobs: list[DecodeJob], encoded: dict[int, list[int]],
                        greedy: dict[int, list[int]], chosen: list[int], steps: int, parts: Path | None = None,
                        progress: bool = True) -> dict[str, dict]:
    """Real decoding of the ``chosen`` prompts by every job, side by side: prompt by prompt, each prompt's jobs in
    the previous prompt's order rotated by one, so that no job always runs first (a shared machine's speed drifts
    over minutes, and a fixed order hands the drift to the same jobs). A rotation still runs each job after the same
    one whenever it is not first: ``benchmarks/adaptive.py`` draws a random order per prompt instead (two identical
    configs read 1.020 [1.000, 1.042] of each other over 78 prompts in a rotation, 0.996 [0.980, 1.012] in a random
    order; one run each, session 24). Every job first decodes 2 tokens of the first prompt untimed (one-time costs:
    kernels' first shapes, a drafter's warm-up), and keeps its own drafter history (what a k=auto schedule learns
    under one rule does not hold under another).

    With ``parts`` each (job, prompt) result is saved as ``parts/<job>/prompt-NNNNN.json`` when made and read back
    instead of rerun (a resumed run's k=auto schedules start their history again). Returns {job name: its
    :func:`combine`}."""
    histories = {job.name: History() for job in jobs}
    results: dict[str, list[dict]] = {job.name: [] for job in jobs}
    todo = sum(parts is None or not (parts / job.name / f"prompt-{i:05d}.json").exists()
               for i in chosen for job in jobs)
    with tqdm(total=todo, desc="decoding", unit="run", disable=not progress or not todo) as bar:
        if todo:
            for job in jobs:  # warm-up, untimed
                if job.drafter is not None:
                    job.drafter.history = histories[job.name]
                generate(loaded, encoded[chosen[0]], job.drafter, job.rule, max_new_tokens=2,
                         **(job.shape if job.drafter is not None else {}))
        for j, i in enumerate(chosen):
            for job in jobs[j % len(jobs):] + jobs[: j % len(jobs)]:
                path = parts / job.name / f"prompt-{i:05d}.json" if parts is not None else None
                if path is not None and path.exists():
                    results[job.name].append(json.loads(path.read_text()))
                    continue
                if job.drafter is not None:
                    job.drafter.history = histories[job.name]
                part = decode_prompt(loaded, job, encoded[i], greedy[i], steps)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _atomic_json(part, path)
                results[job.name].append(part)
                bar.update()
    return {job.name: combine(job, results[job.name]) for job in jobs}


def run_eval(cfg: EvalConfig, out: Path, progress: bool = True) -> Path:
    """Run (or resume) an evaluation into ``out`` and write its report; returns the report folder."""
    from specert.report import write_report

    cfg.validate()
    out = Path(out)
    _check_or_write_config(out, cfg)
    loaded = load_model(cfg.target)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    encoded, batches, dropped = prompt_batches(loaded, prompts, cfg)
    if not batches:
        raise ValueError(f"no prompt fits: all {len(prompts)} are longer than {cfg.max_prompt_tokens} tokens")

    # Phase 1: target steps, one part per batch of prompts.
    steps_dir = out / "steps"
    steps_dir.mkdir(exist_ok=True)
    todo = [b for b in range(len(batches)) if not (steps_dir / f"part-{b:05d}.parquet").exists()]
    total = sum(len(batches[b]) for b in todo) * cfg.steps
    with tqdm(total=total, desc="target steps", unit="step", disable=not progress or not todo) as bar:
        for b in todo:
            table = _target_part(loaded, prompts, encoded, batches[b], cfg)
            _atomic_parquet(table, steps_dir / f"part-{b:05d}.parquet")
            bar.update(len(batches[b]) * cfg.steps)
    steps = pq.read_table(steps_dir)
    greedy: dict[int, list[int]] = {i: [] for i in encoded}
    for i, t in zip(steps.column("prompt_index").to_pylist(), steps.column("token").to_pylist()):
        greedy[i].append(t)  # parts are in step order within each prompt

    # Phase 2: drafters teacher-forced along the greedy text.
    drafters = {spec: drafter_from_spec(spec, loaded) for spec in cfg.drafters}
    for spec, drafter in drafters.items():
        ddir = out / "drafters" / safe_name(spec)
        ddir.mkdir(parents=True, exist_ok=True)
        todo = [b for b in range(len(batches)) if not (ddir / f"part-{b:05d}.parquet").exists()]
        for b in tqdm(todo, desc=f"drafter {spec}", unit="batch", disable=not progress or not todo):
            _atomic_parquet(drafter_part(loaded, spec, drafter, encoded, greedy, batches[b], cfg),
                            ddir / f"part-{b:05d}.parquet")

    # Phase 3: real decoding, batch 1, side by side, on the first prompts (in sample order).
    chosen = sorted(encoded)[: cfg.decode_prompts]
    ddir = out / "decode"
    ddir.mkdir(exist_ok=True)
    jobs = [DecodeJob("target")] if chosen else []
    jobs += [DecodeJob(f"{safe_name(d)}__{safe_name(r)}", drafters[d], r, {"k": cfg.k})
             for d in cfg.drafters for r in cfg.decode_rules if chosen]
    if any(not (ddir / f"{job.name}.json").exists() for job in jobs):
        for name, result in decode_side_by_side(loaded, jobs, encoded, greedy, chosen, cfg.steps, ddir,
                                                progress).items():
            _atomic_json(result, ddir / f"{name}.json")

    info = {"prompts_sampled": len(prompts), "prompts_used": len(encoded), "prompts_dropped": dropped,
            "vocab_size": loaded.vocab_size}
    return write_report(out, cfg, info, [job.name for job in jobs])
