"""`specert eval` end to end on a tiny model, resume after a kill, and the certified-run statistic."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import SPEC_BENCH
from specert.cli import main
from specert.study.evaluation import EvalConfig, run_eval
from specert.study.report import certified_run_length


def test_certified_run_length():
    certs = np.array([0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0])
    prompt = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    # runs: [0,1] (2), [3,4] (2, ends at the prompt boundary), [5,6] (2): mean 2
    assert certified_run_length(certs, prompt, 0.1) == 2.0
    assert certified_run_length(certs, np.zeros(8, int), 0.1) == pytest.approx(6 / 2)  # [0,1] and [3..6]
    assert certified_run_length(certs, prompt, 0.9) == 0.0


def test_eval_end_to_end(tiny_chat_dir, tmp_path):
    cfg = EvalConfig(target=str(tiny_chat_dir), prompts=str(SPEC_BENCH), num_prompts=6, steps=12,
                     drafters=("ngram:2", "layerskip:1"), decode_prompts=2, batch_size=4, k=3)
    report = run_eval(cfg, tmp_path / "out", progress=False)
    for name in ["report.html", "summary.md", "summary.json", "steps.csv", "steps.parquet", "drafters.parquet",
                 "certificates.png", "certificate_vs_margin.png", "certified_runs.png", "drafter_kl.png"]:
        assert (report / name).is_file(), name
    steps = pq.read_table(report / "steps.parquet")
    assert len(set(steps.column("category").to_pylist())) == 6
    assert len(set(zip(steps.column("prompt_index").to_pylist(), steps.column("step").to_pylist()))) == len(steps)
    for r in cfg.rules:
        assert f"cert:{r}" in steps.column_names
    drafters = pq.read_table(report / "drafters.parquet")
    assert len(drafters) == 2 * len(steps)
    for r in cfg.rules:
        certified = np.array(drafters.column(f"certified:{r}").to_pylist())
        accepted = np.array(drafters.column(f"accepted:{r}").to_pylist())
        assert not (certified & ~accepted).any()
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64") == 4 and "Per category" in page
    summary = (report / "summary.md").read_text()
    assert "paper Qwen3-1.7B" in summary and "Real speculative decoding" in summary
    # greedy real decoding reproduces the target: agreement 1 and the same NLL
    import json

    decode = json.loads((report / "summary.json").read_text())["decode"]
    for d in decode:
        if d["rule"] in (None, "greedy"):
            assert d["agreement"] == 1.0 and d["nll"] == pytest.approx(d["nll_greedy"])
        assert d["soundness_violations"] == 0


def _parts(folder):
    return {p.name: p.stat().st_mtime_ns for p in (folder / "steps").glob("part-*.parquet")}


@pytest.mark.slow  # a real process, killed mid-run
def test_interrupted_run_resumes_without_recomputing(tiny_chat_dir, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "specert.cli", "eval", "--target", str(tiny_chat_dir), "--prompts", str(SPEC_BENCH),
            "--num-prompts", "40", "--steps", "40", "--batch-size", "1", "--decode-prompts", "0", "--out", str(out),
            "--rule", "greedy", "--rule", "tree:4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_parts(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _parts(out)
    assert 3 <= len(before) < 40, "the run was not interrupted midway"
    assert not (out / "report").exists()
    res = CliRunner().invoke(main, args[3:])
    assert res.exit_code == 0, res.output
    after = _parts(out)
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing recomputed
    resumed = pq.read_table(out / "report" / "steps.parquet")
    keys = list(zip(resumed.column("prompt_index").to_pylist(), resumed.column("step").to_pylist()))
    assert len(keys) == len(set(keys))  # nothing duplicated
    res = CliRunner().invoke(main, args[3:-6] + ["--out", str(tmp_path / "clean"), "--rule", "greedy",
                                                 "--rule", "tree:4"])
    assert res.exit_code == 0, res.output
    clean = pq.read_table(tmp_path / "clean" / "report" / "steps.parquet")
    assert clean.equals(resumed)
    assert len(_parts(tmp_path / "clean")) == len(after)


def test_resume_with_other_settings_is_refused(tiny_chat_dir, tmp_path):
    cfg = EvalConfig(target=str(tiny_chat_dir), prompts=str(SPEC_BENCH), num_prompts=2, steps=4, decode_prompts=0,
                     rules=("greedy",))
    run_eval(cfg, tmp_path / "o", progress=False)
    cfg.steps = 5
    with pytest.raises(ValueError, match="other settings"):
        run_eval(cfg, tmp_path / "o", progress=False)


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "'--steps': 0 is not in the range x>=1"),
                                           (["--rule", "nope"], "unknown rule"),
                                           (["--drafter", "x:1"], "unknown drafter spec"),
                                           (["--prompts", "/no/file.jsonl"], "no such prompt file")])
def test_eval_cli_errors(args, message, tmp_path):
    res = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


def test_decoding_runs_side_by_side_in_seeded_random_order_and_resumes_per_prompt(tiny_chat_dir, tmp_path, monkeypatch):
    import specert.study.side_by_side as ev
    from specert.decoding.loop import generate
    from specert.decoding.models import encode_prompt, load_model
    from specert.decoding.trace import SpecDecodeMetrics
    from specert.drafters.spec import drafter_from_spec

    loaded = load_model(str(tiny_chat_dir))
    encoded = {i: encode_prompt(loaded, text) for i, text in enumerate(["one two", "three four five", "six"])}
    greedy = {i: generate(loaded, ids, max_new_tokens=6).tokens for i, ids in encoded.items()}
    ngram = drafter_from_spec("ngram:2", loaded)
    jobs = [ev.DecodeJob("target"), ev.DecodeJob("a", ngram, "greedy", {"k": 3}),
            ev.DecodeJob("b", drafter_from_spec("layerskip:1", loaded), "greedy", {"k": "auto"})]
    runs, decode_prompt = [], ev.decode_prompt

    def spy(loaded, job, ids, ref, steps):
        runs.append((job.name, ids))
        if job.drafter is not None:  # each job decodes with its own history
            assert job.drafter.history is histories.setdefault(job.name, job.drafter.history)
        return decode_prompt(loaded, job, ids, ref, steps)

    histories = {}
    monkeypatch.setattr(ev, "decode_prompt", spy)
    out = ev.decode_side_by_side(loaded, jobs, encoded, greedy, [0, 1, 2], 6, tmp_path / "parts", progress=False)
    names = [name for name, _ in runs]
    for p in range(3):  # prompt by prompt, each prompt's jobs in an order of its own
        assert sorted(names[3 * p : 3 * p + 3]) == ["a", "b", "target"]
        assert all(ids == encoded[p] for _, ids in runs[3 * p : 3 * p + 3])
    orders = {}
    for seed in (0, 0, 1):  # the orders are drawn from the seed and the prompt: a resumed run draws the same
        runs.clear()
        histories.clear()
        ev.decode_side_by_side(loaded, jobs, encoded, greedy, [0, 1, 2], 2, None, progress=False, seed=seed)
        orders.setdefault(seed, []).append([name for name, _ in runs])
    assert orders[0][0] == orders[0][1] == names and orders[1][0] != names
    assert histories["a"] is not histories["b"]
    # a job's result is its prompts' counts combined: as if one summary had observed every generation
    ngram.history = None
    whole = SpecDecodeMetrics()
    for i in range(3):
        whole.observe(generate(loaded, encoded[i], ngram, "greedy", k=3, max_new_tokens=6, trace=True))
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_generated_tokens", "num_target_tokens",
                "accepted_per_position", "drafted_per_position", "certified_positions", "soundness_violations"):
        assert out["a"][key] == getattr(whole, key), key
    assert out["target"]["agreement"] == 1.0 and out["a"]["agreement"] == 1.0 and out["a"]["prompts"] == 3
    # a rerun reads every (job, prompt) part back instead of decoding again; a lost part alone is redone
    (tmp_path / "parts" / "b" / "prompt-00001.json").unlink()
    runs.clear()
    histories.clear()
    again = ev.decode_side_by_side(loaded, jobs, encoded, greedy, [0, 1, 2], 6, tmp_path / "parts", progress=False)
    assert runs == [("b", encoded[1])]
    for name in ("target", "a"):
        assert again[name]["seconds"] == out[name]["seconds"]  # read back, not timed again
    assert again["b"]["num_generated_tokens"] == out["b"]["num_generated_tokens"]


def test_every_rule_and_drafter_has_its_own_line_style():
    from specert.study.report import line_styles
    from specert.theory.rules import STANDARD_RULES

    names = list(STANDARD_RULES) + ["drafter int4", "drafter ngram:3", "drafter compiled:int4"]
    styles = line_styles(names)
    colours = [tuple(s["color"]) for s in styles.values()]
    assert len(set(colours)) == len(names)  # up to 20 names, no colour twice
    assert len({(s["linestyle"], s["marker"]) for s in styles.values()}) >= 4
