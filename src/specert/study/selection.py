"""`specert select`: measure candidate drafters, rules and draft shapes on a sample of prompts, and recommend the
fastest configuration that meets a quality constraint.

For each drafter: its KL(p || q) distribution along the target's greedy text, the certified fraction and the
acceptance per rule (teacher-forced, as in `specert eval`). For each (drafter, rule, shape): real decoding, batch 1:
tokens/s relative to the target alone measured side by side in the same run
(:func:`~specert.study.side_by_side.decode_side_by_side`), mean acceptance length, agreement with the target's greedy
output and the target's NLL of the text. The recommendation is the fastest configuration whose agreement is at least
``min_agreement`` and whose NLL exceeds the greedy text's by at most ``max_nll_increase``; it is printed as the
``specert generate`` options that reproduce it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from specert.decoding.loop import generate
from specert.decoding.model_specs import check_model_spec, load_with_progress, waiting
from specert.drafters.spec import drafter_from_spec
from specert.files import atomic_path, write_json, write_text
from specert.study.evaluation import EvalConfig
from specert.study.inputs import check_drafter, check_output_folder, check_rules, check_shape
from specert.study.prompts import SHAREGPT, load_prompts
from specert.study.report import Table
from specert.study.side_by_side import DecodeJob, decode_side_by_side
from specert.study.teacher_forced import drafter_part, prompt_batches


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
        """Check every option and the target's spec without loading it (:mod:`specert.decoding.model_specs`):
        drafters, rules and shapes against the target's vocabulary, layers and context where its header says them.
        Returns the shapes as keyword arguments of :func:`specert.decoding.loop.generate`."""
        for name in ("num_prompts", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min-agreement must be in [0, 1], got {self.min_agreement}")
        if not self.max_nll_increase >= 0:
            raise ValueError(f"max-nll-increase must be >= 0 (inf: no constraint), got {self.max_nll_increase}")
        if not self.drafters or not self.rules or not self.shapes:
            raise ValueError("give at least one drafter, one rule and one shape")
        target = check_model_spec(self.target)
        for d in self.drafters:
            check_drafter(d, target)
        self.rules = tuple(str(r) for r in check_rules(self.rules, target))
        shapes = []
        for s in self.shapes:
            kind, sep, value = s.partition("=")
            if kind not in ("k", "tree") or not sep:
                raise ValueError(f"shape {s!r}: write k=N, k=auto[:K], k=heuristic[:K], tree=W,W,... or tree=auto[:B]")
            check_shape(value if kind == "k" else None, value if kind == "tree" else None, self.steps, target,
                        f"shape {s!r}")
            shapes.append({kind: value})
        return shapes


def run_select(cfg: SelectConfig, out: Path, progress: bool = True) -> dict:
    """Measure every candidate and write ``out/selection.{json,md}`` and ``out/selection.png``; return the JSON.

    Every input is checked before any model is loaded or any file written; ``progress``: bars and waits shown on
    stderr (a terminal only)."""
    shapes = cfg.validate()
    out = check_output_folder(out, "output folder")
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    loaded = load_with_progress(cfg.target, progress)
    ecfg = EvalConfig(target=cfg.target, steps=cfg.steps, rules=cfg.rules, batch_size=len(prompts))
    encoded, batches, _ = prompt_batches(loaded, prompts, ecfg)
    if not encoded:
        raise ValueError("no prompt fits the length limit")
    chosen = sorted(encoded)
    greedy = {i: generate(loaded, encoded[i], max_new_tokens=cfg.steps).tokens for i in chosen}  # the references
    drafter_stats, rows = {}, []
    drafters = {}
    for d in cfg.drafters:
        with waiting(f"preparing drafter {d}", progress and not d.startswith("compiled:")):
            drafters[d] = drafter_from_spec(d, loaded)
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
    results = decode_side_by_side(loaded, jobs, encoded, greedy, chosen, cfg.steps, progress=progress, seed=cfg.seed)
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
    out.mkdir(parents=True, exist_ok=True)
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
    with atomic_path(out / "selection.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    write_text(out / "selection.md", "\n".join([dtable.markdown(), table.markdown(), verdict, "",
                                                "![candidates](selection.png)"]))
    write_json(out / "selection.json", result)
    print(dtable.text() + "\n\n" + table.text() + "\n\n" + verdict)
    print(f"\nwritten: {out / 'selection.md'}, selection.json, selection.png")
