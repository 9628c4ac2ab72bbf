"""Tables, plots and files of a `specert eval` run: Markdown, a self-contained HTML page, CSV and Parquet.

The report folder is built under a temporary name and renamed into place, so an interrupted run never leaves a
half-written report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from specert.files import atomic_path
from specert.theory.bounds import tree_lower_bound, tree_upper_bound

# THEORY.md section 8: the paper's figures for Qwen3-1.7B / Qwen3-4B (500 UltraChat prompts, 128 greedy steps).
PAPER = {
    ("p_top1", "mean"): (0.845, 0.871),
    ("p_top1", "median"): (0.969, 0.988),
    ("p_top1", "p5"): (0.343, 0.391),
    ("top10_mass", "p5"): (0.901, 0.927),
    ("greedy", "mean"): (0.438, 0.468),
    ("greedy", "median"): (0.559, 0.619),
    ("greedy", "p5"): (0.006, 0.007),
    ("additive:0.3", "p5"): (0.102, 0.107),
    ("multiplicative:0.1", "p5"): (0.279, 0.296),
    ("typical:0.09,0.3", "p5"): (0.375, 0.378),
    ("tree:2", "median"): (0.962, None),
    ("tree:4", "median"): (1.456, None),
    ("tree:8", "median"): (2.038, None),
    ("tree:2", "p5"): (0.071, None),
    ("tree:4", "p5"): (0.249, None),
    ("tree:8", "p5"): (0.531, None),
}
EPS_GRID = np.logspace(-3, 0, 13)


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"


class Table:
    def __init__(self, title: str, headers: list[str], rows: list[list], note: str = ""):
        self.title, self.headers, self.rows, self.note = title, headers, rows, note

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + ([f"\n{self.note}"] if self.note else []) + [""])

    def text(self) -> str:
        cells = [self.headers] + [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(self.headers, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def _stats(x: np.ndarray) -> tuple[float, float, float]:
    x = x[~np.isnan(x)]
    if not len(x):
        return (math.nan,) * 3
    finite = x[np.isfinite(x)]
    mean = float(finite.mean()) if len(finite) == len(x) else math.inf
    return mean, float(np.median(x)), float(np.percentile(x, 5))


def certified_run_length(certs: np.ndarray, prompt: np.ndarray, eps: float) -> float:
    """Mean length of maximal runs of consecutive certified steps (eps < C) within each generation (0 if none).

    ``certs`` and ``prompt`` are per step, grouped by prompt in step order."""
    ok = (eps < certs).astype(np.int8)
    # a run starts where ok is 1 and the previous step (of the same prompt) is not
    prev = np.concatenate([[0], ok[:-1]])
    same = np.concatenate([[False], prompt[1:] == prompt[:-1]])
    starts = ok.astype(bool) & ~(same & prev.astype(bool))
    runs = int(starts.sum())
    return float(ok.sum() / runs) if runs else 0.0


def _target_tables(steps: pa.Table, rules: list[str]) -> list[Table]:
    cols = {c: np.asarray(steps.column(c).to_pylist(), dtype=float) for c in ["p_top1", "top10_mass"]}
    rows = []
    for key, label in [("p_top1", "target top-1 probability"), ("top10_mass", "top-10 mass")]:
        mean, med, p5 = _stats(cols[key])
        for stat, val in [("mean", mean), ("median", med), ("p5", p5)]:
            if key == "top10_mass" and stat != "p5":
                continue
            paper = PAPER.get((key, stat), (None, None))
            rows.append([f"{label}, {stat}", val, paper[0], paper[1]])
    out = [Table("Target distribution (paper layout)", ["statistic", "measured", "paper Qwen3-1.7B", "paper Qwen3-4B"],
                 rows)]
    rows = []
    for r in rules:
        c = np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float)
        mean, med, p5 = _stats(c)
        p = {s: PAPER.get((r, s), (None, None)) for s in ("mean", "median", "p5")}
        rows.append([r, mean, med, p5, float(np.isinf(c).mean()),
                     "/".join(_fmt(v) for v in p["median"] if v is not None) or "",
                     "/".join(_fmt(v) for v in p["p5"] if v is not None) or ""])
    out.append(Table("Certificates (nats)", ["rule", "mean", "median", "p5", "share inf", "paper median (1.7B/4B)",
                                             "paper p5 (1.7B/4B)"], rows,
                     "inf: no drafter can be rejected at that step (the rule accepts every token); "
                     "the mean is then inf."))
    if f"exact:{rules[0]}" in steps.column_names:
        out.append(_served_table(steps, rules))
    cats = sorted(set(steps.column("category").to_pylist()))
    if len(cats) > 1:
        cat = np.asarray(steps.column("category").to_pylist())
        rows = []
        for name in cats:
            sel = cat == name
            row = [name, int(sel.sum()), _stats(cols["p_top1"][sel])[0], _stats(cols["top10_mass"][sel])[2]]
            for r in rules:
                c = np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float)[sel]
                row += [_stats(c)[1], _stats(c)[2]]
            rows.append(row)
        headers = ["category", "steps", "top-1 mean", "top-10 p5"] + [f"{r} {s}" for r in rules for s in ("med", "p5")]
        out.append(Table("Per category: certificate median and 5th percentile", headers, rows))
    return out


def _served_table(steps: pa.Table, rules: list[str]) -> Table:
    """A served target's certificates are intervals from its top K (THEORY.md section 9): how often the top K
    determine them, and how wide they are where they do not."""
    rows = []
    for r in rules:
        lower = np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float)
        upper = np.asarray(steps.column(f"cert_upper:{r}").to_pylist(), dtype=float)
        exact = np.asarray(steps.column(f"exact:{r}").to_pylist(), dtype=bool)
        loose = ~exact
        rows.append([r, float(exact.mean()), _stats(lower)[1], _stats(upper)[1],
                     float(np.isinf(upper[loose]).mean()) if loose.any() else math.nan])
    return Table("Certificates from the served top K: share exact, median ends (nats)",
                 ["rule", "exact", "lower end, median", "upper end, median", "upper inf where not exact"], rows,
                 "cert columns and every other table use the lower end: a certificate may understate, never "
                 "overstate.")


def _runs_table(steps: pa.Table, rules: list[str]) -> tuple[Table, dict]:
    prompt = np.asarray(steps.column("prompt_index").to_pylist())
    curves = {}
    for r in rules:
        c = np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float)
        curves[r] = [certified_run_length(c, prompt, e) for e in EPS_GRID]
    shown = [0, 2, 4, 6, 8, 10, 12]
    rows = [[r] + [curves[r][i] for i in shown] for r in rules]
    return Table("Mean certified run length (steps) when every step's drafter has KL <= eps",
                 ["rule"] + [f"eps={EPS_GRID[i]:.3g}" for i in shown], rows), curves


def _drafter_table(drafters: pa.Table | None, rules: list[str]) -> Table | None:
    if drafters is None or not len(drafters):
        return None
    rows = []
    names = drafters.column("drafter").to_pylist()
    served = f"undetermined:{rules[0]}" in drafters.column_names
    for d in dict.fromkeys(names):
        sel = np.asarray(names) == d
        kl_ = np.asarray(drafters.column("kl").to_pylist(), dtype=float)[sel]
        for r in rules:
            acc = np.asarray(drafters.column(f"accepted:{r}").to_pylist(), dtype=bool)[sel]
            cert = np.asarray(drafters.column(f"certified:{r}").to_pylist(), dtype=bool)[sel]
            rows.append([d, r, int(sel.sum()), float(np.nanmedian(kl_)) if np.isfinite(kl_).any() else math.nan,
                         float(cert.mean()), float(acc.mean()), int((cert & ~acc).sum())]
                        + ([_column_mean(drafters, f"undetermined:{r}", sel),
                            1 - _column_mean(drafters, f"decided:{r}", sel)] if served else []))
    headers = ["drafter", "rule", "steps", "KL median", "certified (KL < C)", "accepted", "certified but rejected"]
    return Table("Real drafters along the target's greedy text (teacher-forced)",
                 headers + (["undetermined", "acceptance unknown"] if served else []), rows,
                 "certified but rejected must be 0: a certified step is accepted whatever the drafter."
                 + (" Served target: KL and C are intervals; certified means KL's upper end < C's lower end, "
                    "undetermined that they overlap; acceptance is unknown where the drafter's token is outside the "
                    "top K and the rule's threshold inside the tail's range." if served else ""))


def _column_mean(table: pa.Table, name: str, sel: np.ndarray) -> float:
    return float(np.asarray(table.column(name).to_pylist(), dtype=bool)[sel].mean())


def _decode_table(decode: list[dict]) -> Table | None:
    if not decode:
        return None
    base = next((d for d in decode if d["drafter"] is None), None)
    rows = []
    for d in decode:
        speed = d["tokens_per_second"] / base["tokens_per_second"] if base else math.nan
        rows.append([d["drafter"] or "target alone", d["rule"] or "-", d["tokens_per_second"], speed,
                     d["mean_acceptance_length"], d["agreement"], d["nll"], d["nll_greedy"],
                     f"{d['soundness_violations']} / {d['certified_positions']} / {d['traced_positions']}"])
    return Table("Real speculative decoding, batch 1 (measured in this run)",
                 ["drafter", "rule", "tokens/s", "x target alone", "mean acceptance length", "agreement with greedy",
                  "NLL (nats/token)", "NLL of greedy text", "violations / certified / traced"], rows,
                 "agreement: share of positions where the output equals the target's greedy output; NLL: the target's "
                 "mean negative log-likelihood of the generated text.")


def line_styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, line style, marker) for each name, the same in every plot of a report: tab20's colours
    in the order dark, light of each hue's pair last (so that neighbours differ in hue), and a line style and a
    marker that change with every name as well, so that no two lines look alike even in grey."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    colours = [tab20[i] for i in range(0, 20, 2)] + [tab20[i] for i in range(1, 20, 2)]
    dashes, markers = ["-", "--", "-.", ":"], ["o", "s", "^", "v", "D", "x", "+", "*", "P", "X"]
    return {n: dict(color=colours[i % 20], linestyle=dashes[i % 4], marker=markers[i % 10], markevery=0.1)
            for i, n in enumerate(names)}


def _plots(folder: Path, steps: pa.Table, rules: list[str], curves: dict, drafters: pa.Table | None,
           vocab: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    names = list(rules) + [r for r in curves if r not in rules]
    if drafters is not None and len(drafters):
        names += [f"drafter {d}" for d in dict.fromkeys(drafters.column("drafter").to_pylist())]
    style = line_styles(names)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rules:
        c = np.sort(np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float))
        ax.plot(np.clip(c, 1e-6, None), np.arange(1, len(c) + 1) / len(c), label=r, markersize=4, **style[r])
    ax.set(xscale="log", xlabel="certificate C_p (nats)", ylabel="fraction of steps <= C",
           title="Certificates per rule")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "certificates.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    g = np.asarray(steps.column("margin").to_pylist(), dtype=float)
    c = np.asarray(steps.column("cert:greedy").to_pylist(), dtype=float) if "greedy" in rules else None
    if c is not None:
        ax.scatter(g, c, s=3, alpha=0.3, label="steps")
        grid = np.linspace(0, 1, 200)
        ax.plot(grid, tree_lower_bound(grid, 1).numpy(), "k-", label="sharp lower bound kl2((1+g)/2)")
        ax.plot(grid, tree_upper_bound(grid, 1, vocab).numpy(), "k--", label=f"sharp upper bound (V={vocab})")
        ax.set(xlabel="margin p(1) - p(2)", ylabel="strict greedy certificate (nats)",
               title="Greedy certificate against margin")
        ax.legend(fontsize=8)
        save(fig, "certificate_vs_margin.png")
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, ys in curves.items():
        ax.plot(EPS_GRID, ys, label=r, markersize=4, **{**style[r], "markevery": 1})
    ax.set(xscale="log", yscale="log", xlabel="eps (drafter KL bound, nats)", ylabel="mean certified run length",
           title="Certified runs")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "certified_runs.png")

    if drafters is not None and len(drafters):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        which = np.asarray(drafters.column("drafter").to_pylist())
        kl_ = np.asarray(drafters.column("kl").to_pylist(), dtype=float)
        for d in dict.fromkeys(which):
            x = np.sort(kl_[(which == d) & np.isfinite(kl_)])
            if len(x):
                ax.plot(np.clip(x, 1e-6, None), np.arange(1, len(x) + 1) / len(x), label=f"KL(p||q), {d}",
                        linewidth=2.2, markersize=5, **{**style[f"drafter {d}"], "linestyle": "-"})
        for r in [r for r in ("greedy", "typical:0.09,0.3", "tree:4") if r in rules]:
            cc = np.sort(np.asarray(steps.column(f"cert:{r}").to_pylist(), dtype=float))
            ax.plot(np.clip(cc, 1e-6, None), np.arange(1, len(cc) + 1) / len(cc), label=f"certificate, {r}",
                    linewidth=1.2, markersize=4, **{**style[r], "linestyle": "--"})
        ax.set(xscale="log", xlabel="nats", ylabel="fraction of steps", title="Drafters' KL against the certificates")
        ax.legend(fontsize=7)
        save(fig, "drafter_kl.png")
    return files


def _soundness_audit(drafters: pa.Table | None, decode: list[dict], rules: list[str]) -> str:
    """One line: certified steps (KL < C) seen with real drafters, and how many were rejected (must be 0)."""
    certified = rejected = unknown = 0
    if drafters is not None:
        for r in rules:
            cert = np.asarray(drafters.column(f"certified:{r}").to_pylist(), dtype=bool)
            acc = np.asarray(drafters.column(f"accepted:{r}").to_pylist(), dtype=bool)
            decided = np.asarray(drafters.column(f"decided:{r}").to_pylist(), dtype=bool) \
                if f"decided:{r}" in drafters.column_names else np.ones_like(cert)
            certified += int(cert.sum())
            rejected += int((cert & decided & ~acc).sum())
            unknown += int((cert & ~decided).sum())
    live_c = sum(d["certified_positions"] for d in decode)
    live_r = sum(d["soundness_violations"] for d in decode)
    verdict = "SOUND" if rejected == live_r == 0 else "VIOLATED"
    unknown_note = f" ({unknown} whose acceptance the top K leave unknown)" if unknown else ""
    return (f"Soundness audit: {verdict}. {certified} certified (step, rule) pairs along the greedy text, "
            f"{rejected} rejected{unknown_note}; {live_c} certified positions in real decoding, {live_r} rejected.")


def write_report(out: Path, cfg, info: dict, decode_names: list[str]) -> Path:
    """Write ``out/report`` (atomically) from the run's parts; print the headline tables; return the folder."""
    # parts are written step-major within a batch: group each generation's steps together, in order
    steps = pq.read_table(out / "steps").sort_by([("prompt_index", "ascending"), ("step", "ascending")])
    rules = list(cfg.rules)
    parts = [pq.read_table(out / "drafters" / d) for d in sorted(os.listdir(out / "drafters"))] \
        if (out / "drafters").exists() else []
    wanted = {d for d in cfg.drafters}
    parts = [p for p in parts if len(p) and p.column("drafter")[0].as_py() in wanted]
    drafters = pa.concat_tables(parts, promote_options="default") if parts else None
    decode = [json.loads((out / "decode" / f"{n}.json").read_text()) for n in decode_names
              if (out / "decode" / f"{n}.json").exists()]

    audit = _soundness_audit(drafters, decode, rules)
    tables = _target_tables(steps, rules)
    runs, curves = _runs_table(steps, rules)
    tables.append(runs)
    for t in (_drafter_table(drafters, rules), _decode_table(decode)):
        if t is not None:
            tables.append(t)

    final = out / "report"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        _write_report_files(tmp, steps, drafters, rules, curves, tables, cfg, info, decode, audit)
    for t in tables:
        print("\n" + t.text())
    print("\n" + audit)
    print(f"\nreport: {final / 'report.html'} (also summary.md, CSV and Parquet of every step)")
    return final


def _write_report_files(tmp: Path, steps, drafters, rules, curves, tables, cfg, info, decode, audit) -> None:
    """The report's files, written into the folder ``tmp``."""
    plots = _plots(tmp, steps, rules, curves, drafters, info["vocab_size"])
    pq.write_table(steps, tmp / "steps.parquet")
    pacsv.write_csv(steps, tmp / "steps.csv")
    if drafters is not None:
        pq.write_table(drafters, tmp / "drafters.parquet")
        pacsv.write_csv(drafters, tmp / "drafters.csv")
    what = (f"target {cfg.target}, prompts {cfg.prompts}: {info['prompts_used']} used ({info['prompts_dropped']} "
            f"longer than {cfg.max_prompt_tokens} tokens dropped), up to {cfg.steps} greedy steps each, "
            f"{len(steps)} steps in all.")
    header = f"# specert eval\n\n{what}\n\n**{audit}**\n"
    md = header + "\n" + "\n".join(t.markdown() for t in tables) + "\n" + "\n".join(f"![{p}]({p})" for p in plots)
    (tmp / "summary.md").write_text(md)
    imgs = "".join(f'<img src="data:image/png;base64,{base64.b64encode((tmp / p).read_bytes()).decode()}" '
                   f'alt="{p}">' for p in plots)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>specert eval</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>specert eval</h1><p>{html.escape(what)}</p><p><b>{html.escape(audit)}</b></p>"
            + "".join(t.html() for t in tables) + imgs + "</body></html>")
    (tmp / "report.html").write_text(page)
    (tmp / "summary.json").write_text(json.dumps({"info": info, "decode": decode, "tables": [
        {"title": t.title, "headers": t.headers, "rows": [[_fmt(v) for v in r] for r in t.rows]} for t in tables]},
        indent=1))
