"""Every subcommand through a table of bad inputs: each is one line ``Error: ...`` naming what was wrong, exit code 2
for bad input and 1 for a run that failed, never a traceback, found before any model is loaded, with nothing
written.

Model loads are replaced by a stub that records the spec and raises, so that a check which came after the load
fails its case; the folder a case runs in is compared file by file before and after.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from specert.cli import main

# Every module that imported load_model by name, and the loader underneath them all.
LOADERS = ["specert.decoding.models", "specert.decoding.model_specs", "specert.drafters.spec",
           "specert.train.training", "specert.study.served"]


class ModelLoaded(RuntimeError):
    """Raised by the stub loader: a case reached a model load."""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with the files the cases name, and model loads recorded (and refused)."""
    import importlib

    import transformers

    loads = []

    def stub(spec, *args, **kwargs):
        loads.append(spec)
        raise ModelLoaded(f"model load reached: {spec}")

    for name in LOADERS:
        monkeypatch.setattr(importlib.import_module(name), "load_model", stub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file where a folder is expected\n")
    (tmp_path / "good.jsonl").write_text('{"prompt": "Write a haiku about the sea."}\n' * 4)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    (tmp_path / "text.npy").write_text("1 2 3\n4 5 6\n")
    np.save(tmp_path / "empty.npy", np.zeros((0,), np.float32))
    np.save(tmp_path / "norows.npy", np.zeros((0, 16), np.float32))
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    np.save(tmp_path / "onetoken3d.npy", np.zeros((2, 3, 1), np.float32))
    np.save(tmp_path / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0]], np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((2, 4), np.int64))
    np.save(tmp_path / "good.npy", np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    yield tmp_path, loads
    readonly.chmod(0o700)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _run(root: Path, argv: list[str]):
    before = _files(root)
    res = CliRunner().invoke(main, argv)
    assert _files(root) == before, f"{argv} wrote files: {sorted(set(_files(root)) - set(before))}"
    return res


def _one_error_line(res, code: int, *needles: str) -> str:
    """Assert exit ``code``, exactly one output line ``Error: ...`` holding every needle, no traceback."""
    assert res.exc_info is None or res.exc_info[0] is SystemExit, res.exc_info
    lines = res.output.strip().splitlines()
    assert res.exit_code == code, res.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD = 2  # bad input
FAILED = 1  # a run that failed

# (arguments, exit code, what the message says); {d} is the working folder.
CASES = [
    # certify: files of logits that are not
    (["certify", "{d}/empty.npy"], BAD, ["empty.npy", "V >= 2"]),
    (["certify", "{d}/norows.npy"], BAD, ["norows.npy", "no rows"]),
    (["certify", "{d}/text.npy"], BAD, ["text.npy", "not a .npy file"]),
    (["certify", "{d}/scalar.npy"], BAD, ["scalar.npy", "[..., V]"]),
    (["certify", "{d}/onetoken3d.npy"], BAD, ["onetoken3d.npy", "V >= 2"]),
    (["certify", "{d}/nan.npy"], BAD, ["nan.npy", "row 1", "NaN"]),
    (["certify", "{d}/ints.npy"], BAD, ["ints.npy", "floating-point"]),
    (["certify", "{d}/missing.npy"], BAD, ["missing.npy", "no such file"]),
    (["certify", "{d}"], BAD, ["is a directory"]),
    (["certify", "{d}/good.npy", "--draft", "{d}/norows.npy"], BAD, ["norows.npy"]),
    (["certify", "{d}/good.npy", "--draft", "{d}/missing.pt"], BAD, ["missing.pt", "no such file"]),
    (["certify", "{d}/good.npy", "--rule", "additive:2"], BAD, ["additive", "t >= 1", "every draft"]),
    (["certify", "{d}/good.npy", "--rule", "bogus"], BAD, ["unknown rule", "bogus"]),
    (["certify", "{d}/good.npy", "--rule", "topm:16"], BAD, ["topm:16", "16"]),
    # bench
    (["bench", "--batch", "0"], BAD, ["--batch"]),
    (["bench", "--vocab", "1"], BAD, ["--vocab"]),
    (["bench", "--repeat", "0"], BAD, ["--repeat"]),
    (["bench", "--batch", "many"], BAD, ["--batch", "many"]),
    # generate: every input before the target loads
    (["generate", "--prompt", "Write a haiku", "--trace", "/nonexistent_dir/t.parquet"], BAD,
     ["--trace", "/nonexistent_dir"]),
    (["generate", "--prompt", "Write a haiku", "--trace", "{d}/FILE/t.parquet"], BAD, ["--trace", "which is a file"]),
    (["generate", "--prompt", "Write a haiku", "--trace", "{d}/t.csv"], BAD, ["--trace", ".parquet"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "model:/nonexistent"], BAD,
     ["drafter 'model:/nonexistent'", "no such file"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "bogus"], BAD, ["unknown drafter", "bogus"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "head:{d}/none.safetensors"], BAD,
     ["drafter 'head:", "none.safetensors", "no such file"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "head:{d}/text.npy"], BAD,
     ["text.npy", "not a draft head"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "compiled:ngram:3"], BAD, ["compiled:"]),
    (["generate", "--prompt", "Write a haiku", "--drafter", "layerskip:99"], BAD, ["layerskip", "30"]),
    (["generate", "--prompt", "Write a haiku", "--rule", "additive:2"], BAD, ["additive", "t >= 1"]),
    (["generate", "--prompt", "Write a haiku", "--rule", "bogus"], BAD, ["unknown rule"]),
    (["generate", "--prompt", "Write a haiku", "--k", "0"], BAD, ["--k", ">= 1"]),
    (["generate", "--prompt", "Write a haiku", "--k", "-1"], BAD, ["--k", ">= 1"]),
    (["generate", "--prompt", "Write a haiku", "--k", "many"], BAD, ["--k", "many"]),
    (["generate", "--prompt", "Write a haiku", "--tree", "0,2"], BAD, ["--tree", "0,2"]),
    (["generate", "--prompt", "Write a haiku", "--tree", "auto:0"], BAD, ["--tree"]),
    (["generate", "--prompt", "Write a haiku", "--k", "4", "--tree", "2,1"], BAD, ["not both"]),
    (["generate", "--prompt", "Write a haiku", "--k", "100000"], BAD, ["--k 100000", "context"]),
    (["generate", "--prompt", "Write a haiku", "--max-new-tokens", "0"], BAD, ["--max-new-tokens"]),
    (["generate", "--prompt", "Write a haiku", "--quantile", "0"], BAD, ["--quantile"]),
    (["generate", "--prompt", "  "], BAD, ["--prompt is empty"]),
    (["generate"], BAD, ["--prompt"]),
    (["generate", "--prompt", "Write a haiku", "--target", "/nonexistent"], BAD, ["/nonexistent", "no such file"]),
    (["generate", "--prompt", "Write a haiku", "--target", "http://127.0.0.1:9/v1"], BAD, ["served model"]),
    # eval
    (["eval", "--prompts", "/nonexistent.jsonl", "--out", "{d}/D"], BAD,
     ["no such prompt file: /nonexistent.jsonl", "give a JSONL file"]),
    (["eval", "--prompts", "{d}/broken.jsonl", "--out", "{d}/D"], BAD, ["broken.jsonl:2", "not JSON"]),
    (["eval", "--out", "{d}/FILE/sub"], BAD, ["FILE", "which is a file"]),
    (["eval", "--out", "{d}/FILE"], BAD, ["FILE", "is a file"]),
    (["eval", "--drafter", "model:/nonexistent"], BAD, ["drafter 'model:/nonexistent'", "no such file"]),
    (["eval", "--drafter", "bogus"], BAD, ["unknown drafter"]),
    (["eval", "--rule", "additive:2"], BAD, ["additive", "t >= 1"]),
    (["eval", "--rule", "bogus"], BAD, ["unknown rule"]),
    (["eval", "--decode-rule", "bogus", "--drafter", "ngram:3"], BAD, ["unknown rule"]),
    (["eval", "--target", "/nonexistent"], BAD, ["/nonexistent", "no such file"]),
    (["eval", "--target", "http://127.0.0.1:x/v1"], BAD, ["port"]),
    (["eval", "--num-prompts", "0"], BAD, ["--num-prompts"]),
    (["eval", "--steps", "0"], BAD, ["--steps"]),
    (["eval", "--batch-size", "0"], BAD, ["--batch-size"]),
    (["eval", "--k", "-1"], BAD, ["--k"]),
    (["eval", "--decode-prompts", "-1"], BAD, ["--decode-prompts"]),
    (["eval", "--max-prompt-tokens", "0"], BAD, ["--max-prompt-tokens"]),
    (["eval", "--concurrency", "0"], BAD, ["--concurrency"]),
    (["eval", "--timeout", "0"], BAD, ["--timeout"]),
    (["eval", "--timeout", "nan"], BAD, ["timeout", "nan"]),
    (["eval", "--logprobs", "-1"], BAD, ["--logprobs"]),
    (["eval", "--retries", "-1"], BAD, ["--retries"]),
    (["eval", "--steps", "100000"], BAD, ["--steps 100000", "context"]),
    (["eval", "--target", "http://127.0.0.1:9/v1", "--retries", "0", "--prompts", "{d}/good.jsonl",
      "--out", "{d}/D"], FAILED, ["cannot reach", "127.0.0.1:9"]),
    (["eval", "--target", "http://127.0.0.1:9/v1", "--prompts", "/nonexistent.jsonl", "--out", "{d}/D"], BAD,
     ["/nonexistent.jsonl"]),
    (["eval", "--target", "http://127.0.0.1:9/v1", "--drafter", "int4"], BAD, ["int4"]),
    # select
    (["select", "--prompts", "/nonexistent.jsonl", "--out", "{d}/S"], BAD, ["/nonexistent.jsonl", "no such"]),
    (["select", "--out", "{d}/FILE/sub"], BAD, ["FILE", "which is a file"]),
    (["select", "--shape", "k=0"], BAD, ["k=0"]),
    (["select", "--shape", "tree=0,2"], BAD, ["tree=0,2"]),
    (["select", "--shape", "wide"], BAD, ["wide"]),
    (["select", "--drafter", "model:/nonexistent"], BAD, ["drafter 'model:/nonexistent'"]),
    (["select", "--rule", "additive:2"], BAD, ["additive", "t >= 1"]),
    (["select", "--num-prompts", "0"], BAD, ["--num-prompts"]),
    (["select", "--steps", "0"], BAD, ["--steps"]),
    (["select", "--min-agreement", "2"], BAD, ["--min-agreement"]),
    (["select", "--max-nll-increase", "nan"], BAD, ["max-nll-increase", "nan"]),
    # distill
    (["distill", "--data", "/nonexistent.jsonl"], BAD, ["/nonexistent.jsonl", "no such"]),
    (["distill", "--data", "{d}/broken.jsonl"], BAD, ["broken.jsonl:2"]),
    (["distill", "--out", "{d}/FILE/head.safetensors"], BAD, ["FILE", "which is a file"]),
    (["distill", "--out", "{d}"], BAD, ["--out", "is a directory"]),
    (["distill", "--work", "{d}/FILE"], BAD, ["FILE", "is a file"]),
    (["distill", "--layers", "3,x"], BAD, ["--layers"]),
    (["distill", "--layers", "3,15,99"], BAD, ["feature layers", "30"]),
    (["distill", "--rule", "bogus"], BAD, ["unknown rule"]),
    (["distill", "--rule", "additive:2"], BAD, ["additive", "t >= 1"]),
    (["distill", "--steps", "0"], BAD, ["--steps"]),
    (["distill", "--batch-size", "0"], BAD, ["--batch-size"]),
    (["distill", "--texts", "0"], BAD, ["--texts"]),
    (["distill", "--lr", "0"], BAD, ["--lr"]),
    (["distill", "--lr", "nan"], BAD, ["lr", "nan"]),
    (["distill", "--hinge", "nan"], BAD, ["hinge", "nan"]),
    (["distill", "--architecture", "pruned", "--drop", "30"], BAD, ["drop", "30"]),
    (["distill", "--target", "/nonexistent"], BAD, ["/nonexistent"]),
    # click's own usage errors
    (["eval", "--no-such-option"], BAD, ["--no-such-option", "--help"]),
    (["no-such-command"], BAD, ["no-such-command"]),
]


@pytest.mark.parametrize("argv, code, needles", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_before_any_load(sandbox, argv, code, needles):
    root, loads = sandbox
    res = _run(root, [a.format(d=root) for a in argv])
    _one_error_line(res, code, *needles)
    assert loads == []


def test_eval_refused_prompts_leave_the_folder_usable(sandbox):
    """A run refused for its prompts records nothing, so the same folder takes the corrected run (which gets as
    far as loading the target)."""
    root, loads = sandbox
    res = _run(root, ["eval", "--prompts", "/nonexistent.jsonl", "--out", "D", "--num-prompts", "2"])
    _one_error_line(res, BAD, "/nonexistent.jsonl")
    assert not (root / "D").exists()
    res = _run(root, ["eval", "--prompts", "good.jsonl", "--out", "D", "--num-prompts", "2"])
    _one_error_line(res, FAILED, "model load reached: smollm2-135m")
    assert loads == ["smollm2-135m"]


@pytest.mark.parametrize("command", [
    ["eval", "--out", "{ro}/run"],
    ["eval", "--out", "{ro}"],
    ["select", "--out", "{ro}/sel"],
    ["distill", "--work", "{ro}/work"],
    ["distill", "--out", "{ro}/head.safetensors"],
    ["generate", "--prompt", "Write a haiku", "--trace", "{ro}/t.parquet"],
])
@pytest.mark.parametrize("where", ["chmod", "proc"])
def test_unwritable_folder(sandbox, command, where):
    """A folder without write permission (chmod 0o500, which does not hold for root) or a file system that takes no
    files (/proc, which holds for root too)."""
    root, loads = sandbox
    ro = root / "readonly" if where == "chmod" else Path("/proc")
    if not ro.is_dir() or os.access(ro, os.W_OK) and where == "chmod":
        pytest.skip(f"{ro} is writable here (running as root?)")
    res = _run(root, [a.format(ro=ro) for a in command])
    _one_error_line(res, BAD, str(ro), "cannot write")
    assert loads == []


def test_good_inputs_reach_the_load(sandbox):
    """The stub is what stops a good run: the table's refusals are the checks', not the stub's."""
    root, loads = sandbox
    res = _run(root, ["generate", "--prompt", "Write a haiku", "--trace", "t.parquet", "--drafter", "ngram:3"])
    _one_error_line(res, FAILED, "model load reached")
    assert loads == ["smollm2-135m"]


def test_certify_reads_leading_dimensions_as_steps(sandbox):
    """A [2, 3, V] array is six steps (the leading dimensions flattened), not bad input."""
    root, _ = sandbox
    res = CliRunner().invoke(main, ["certify", str(root / "good.npy"), "--rule", "greedy"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) == 1 + 6
