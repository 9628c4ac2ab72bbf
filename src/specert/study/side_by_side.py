"""Real decoding, batch 1, of several jobs (the target alone; drafters under rules and draft shapes) side by side on
the same prompts, so that their speeds compare as ratios measured in one run; with each job's acceptance counts,
its agreement with the target's greedy text and the target's NLL of what it wrote."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from specert.decoding.loop import generate
from specert.decoding.models import LoadedModel
from specert.decoding.schedules import History
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters import Drafter
from specert.files import write_json


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
    (``{"k": ...}`` or ``{"tree": ...}``, as :func:`~specert.decoding.loop.generate` takes them)."""

    name: str
    drafter: Drafter | None = None
    rule: str = "greedy"
    shape: dict = field(default_factory=dict)


def decode_prompt(loaded: LoadedModel, job: DecodeJob, ids: list[int], ref: list[int], steps: int) -> dict:
    """One prompt's real decoding, batch 1, by ``job``: its counts
    (:class:`~specert.decoding.trace.SpecDecodeMetrics`), its agreement with ``ref`` (the target's greedy text) and
    the target's NLL of both texts."""
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
                        progress: bool = True, seed: int = 0) -> dict[str, dict]:
    """Real decoding of the ``chosen`` prompts by every job, side by side: prompt by prompt, each prompt's jobs in
    an order drawn at random from a generator seeded by ``seed`` and the prompt's index (so that a resumed run
    draws the same orders). A shared machine's speed drifts over minutes: a fixed order hands the drift to the same
    jobs, and a rotation runs each job after the same one whenever it is not first. Every job first decodes 2
    tokens of the first prompt untimed (one-time costs: kernels' first shapes, a drafter's warm-up), and keeps its
    own drafter history (what a k=auto schedule learns under one rule does not hold under another).

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
        for i in chosen:
            for job in random.Random(f"{seed}:{i}").sample(jobs, len(jobs)):
                path = parts / job.name / f"prompt-{i:05d}.json" if parts is not None else None
                if path is not None and path.exists():
                    results[job.name].append(json.loads(path.read_text()))
                    continue
                if job.drafter is not None:
                    job.drafter.history = histories[job.name]
                part = decode_prompt(loaded, job, encoded[i], greedy[i], steps)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, part)
                results[job.name].append(part)
                bar.update()
    return {job.name: combine(job, results[job.name]) for job in jobs}
