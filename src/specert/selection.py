"""`specert select`: measure candidate drafters, rules and draft shapes on a sample of prompts, and recommend the
fastest configuration that meets a quality constraint.

For each drafter: its KL(p || q) distribution along the target's greedy text, the certified fraction and the
acceptance per rule (teacher-forced, as in `specert eval`). For each (drafter, rule, shape): real decoding, batch 1:
tokens/s relative to the target alone measured side by side in the same run
(:func:`~specert.evaluation.decode_side_by_side`), mean acceptance length, agreement with the target's greedy output
and the target's NLL of the text. The recommendation is the fastest configuration whose agreement is at least
``min_agreement`` and whose NLL exceeds the greedy text's by at most ``max_nll_increase``; it is printed as the
``specert generate`` options that reproduce it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from specert.decoding import generate
from specert.drafters import check_drafter_spec, drafter_from_spec
from specert.evaluation import DecodeJob, EvalConfig, decode_side_by_side, drafter_part, prompt_batches
from specert.models import load_model
from specert.prompts import SHAREGPT, load_prompts
from specert.report import Table
from specert.rules import rule
from specert.schedules import make_schedule


@dataclass
class SelectConfig:
    target: str = "smollm2-135m"
    prompts: str = SHAREGPT
    num_prompts: int = 4
    steps: int = 48
    drafters: tuple[str, ...] = ("ngram:3",)
    rules: tuple[str, ...] = ("greedy", "typical:0.09,0.3")
    shapes: tuple[str, ...] = ("k=4", "k=auto")
    min_agreement: float = 0.9
    max_nll_increase: float = math.inf
    seed: int = 0

    def validate(self) -> list[dict]:
        """Check every option; return the shapes as keyword arguments of :func:`specert.decoding.generate`."""
        for name in ("num_prompts", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min-agreement must be in [0, 1], got {self.min_agreement}")
        if not self.drafters or not self.rules or not self.shapes:
            raise ValueError("give at least one drafter, one rule and one shape")
        for d in self.drafters:
            check_drafter_spec(d)
        self.rules = tuple(str(rule(r)) for r in self.rules)
        shapes = []
        for s in self.shapes:
            kind, sep, value = s.partition("=")
            if kind not in ("k", "tree") or not sep:
                raise ValueError(f"shape {s!r}: write k=N, k=auto[:K], k=heuristic[:K], tree=W,W,... or tree=auto[:B]")
            make_schedule(**{kind: value})
            shapes.append({kind: value})
        return shapes


def run_select(cfg: SelectConfig, out: Path, progress: bool = True) -> dict:
    """Measure every candidate and write ``out/selection.{json,md}`` and ``out/selection.png``; return the JSON."""
    shapes = cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(cfg.target)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    ecfg = EvalConfig(target=cfg.target, steps=cfg.steps, rules=cfg.rules, batch_size=len(prompts))
    encoded, batches, _ = prompt_batches(loaded, prompts, ecfg)
    if not encoded:
        raise ValueError("no prompt fits the length limit")
    chosen = sorted(encoded)
    greedy = {i: generate(loaded, encoded[i], max_new_tokens=cfg.steps).tokens for i in chosen}  # the references
    drafter_stats, rows = {}, []
    drafters = {d: drafter_from_spec(d, loaded) for d in cfg.drafters}
    candidates = [(d, r, s) for d in cfg.drafters for r in cfg.rules for s in shapes]
    jobs = [DecodeJob("target")] + [DecodeJob(f"{d} {r} {s}", drafters[d], r, s) for d, r, s in candidates]
    for d, drafter in drafters.items():
        table = drafter_part(loaded, d, drafter, encoded, greedy, chosen, ecfg)
        kl = np.asarray(table.column("kl").to_pylist(), dtype=float)
        drafter_stats[d] = {
            "kl_median": float(np.nanmedian(kl)) if np.isfinite(kl).any() else None,
            "kl_p90": float(np.nanpercentile(kl, 90)) if np.isfinite(kl).any() else None,
            **{f"certified:{r}": float(np.mean(table.column(f"certified:{r}").to_pylist())) for r in cfg.rules},
            **{f"accepted:{r}": float(np.mean(table.column(f"accepted:{r}").to_pylist())) for r in cfg.rules},
        }
    results = decode_side_by_side(loaded, jobs, encoded, greedy, chosen, cfg.steps, progress=progress)
    base_tps = results["target"]["tokens_per_second"]
    for (d, r, s), job in zip(candidates, jobs[1:]):
        res = results[job.name]
        kind, value = next(iter(s.items()))
        speedup = res["tokens_per_second"] / base_tps
        ok = res["agreement"] >= cfg.min_agreement and res["nll"] <= res["nll_greedy"] + cfg.max_nll_increase
        accepted = res["mean_acceptance_length"]  # NaN where nothing was drafted (JSON: null)
        rows.append({"drafter": d, "rule": r, kind: value, "shape": f"{kind}={value}", "speedup": speedup,
                     "tokens_per_second": res["tokens_per_second"], "mean_acceptance_length":
                     accepted if math.isfinite(accepted) else None, "agreement": res["agreement"], "nll": res["nll"],
                     "nll_greedy": res["nll_greedy"], "meets_quality": ok,
                     "soundness_violations": res["soundness_violations"],
                     "generate_options": f"--target {cfg.target} --drafter {d} --rule '{r}' --{kind} {value}"})
    eligible = [row for row in rows if row["meets_quality"]]
    best = max(eligible, key=lambda row: row["speedup"]) if eligible else None
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "target_tokens_per_second": base_tps, "drafters": drafter_stats,
              "candidates": rows, "recommendation": best}
    _write(out, cfg, result)
    return result


def _write(out: Path, cfg: SelectConfig, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    table = Table("Candidates (tokens/s relative to the target alone, same run)",
                  ["drafter", "rule", "shape", "speedup", "mean acceptance length", "agreement", "NLL", "NLL greedy",
                   "meets quality"],
                  [[r["drafter"], r["rule"], r["shape"], r["speedup"],
                    r["mean_acceptance_length"] if r["mean_acceptance_length"] is not None else math.nan,
                    r["agreement"], r["nll"], r["nll_greedy"], r["meets_quality"]] for r in rows])
    dtable = Table("Drafters along the target's greedy text", ["drafter", "KL median", "KL p90"]
                   + [f"certified {r}" for r in cfg.rules] + [f"accepted {r}" for r in cfg.rules],
                   [[d, s["kl_median"] if s["kl_median"] is not None else math.nan,
                     s["kl_p90"] if s["kl_p90"] is not None else math.nan]
                    + [s[f"certified:{r}"] for r in cfg.rules] + [s[f"accepted:{r}"] for r in cfg.rules]
                    for d, s in result["drafters"].items()])
    best = result["recommendation"]
    verdict = (f"Recommended: specert generate {best['generate_options']} ({best['speedup']:.2f}x the target alone, "
               f"agreement {best['agreement']:.3f})" if best else
               f"No candidate meets the quality constraint (agreement >= {cfg.min_agreement}).")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["agreement"], r["speedup"], c="tab:green" if r["meets_quality"] else "tab:gray")
        ax.annotate(f"{r['drafter']} {r['rule']} {r['shape']}", (r["agreement"], r["speedup"]), fontsize=6)
    ax.axvline(cfg.min_agreement, ls="--", c="k", lw=0.8)
    ax.axhline(1.0, ls=":", c="k", lw=0.8)
    ax.set(xlabel="agreement with the target's greedy output", ylabel="tokens/s relative to the target alone",
           title="Candidate configurations")
    fig.tight_layout()
    tmp = out / f".selection.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out / "selection.png")
    for name, text in [("selection.md", "\n".join([dtable.markdown(), table.markdown(), verdict, "",
                                                  "![candidates](selection.png)"])),
                       ("selection.json", json.dumps(result, indent=1))]:
        tmp = out / f".{name}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(dtable.text() + "\n\n" + table.text() + "\n\n" + verdict)
    print(f"\nwritten: {out / 'selection.md'}, selection.json, selection.png")
