"""`specert certify` and `specert bench`: files in three formats, JSON, and one-line errors; `specert generate`'s
waits shown on a terminal only."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import specert
from specert.cli import main


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 40, generator=g) * 3
    draft = target + torch.randn(3, 40, generator=g)
    np.save(tmp_path / "t.npy", target.numpy())
    torch.save({"logits": draft}, tmp_path / "d.pt")
    save_file({"logits": target}, tmp_path / "t.safetensors")
    return tmp_path, target, draft


def test_certify_table_and_json(files):
    path, target, draft = files
    runner = CliRunner()
    res = runner.invoke(main, ["certify", str(path / "t.npy"), "--draft", str(path / "d.pt"), "--rule", "greedy",
                               "--rule", "tree:4", "--json"])
    assert res.exit_code == 0, res.output
    records = json.loads(res.output)
    assert len(records) == 3 * 2
    first = records[0]
    assert first["rule"] == "greedy"
    assert first["certificate"] == pytest.approx(float(specert.certificate(target[0], "greedy")), rel=1e-6)
    assert first["kl"] == pytest.approx(float(specert.kl(target[0], draft[0])), rel=1e-6)
    assert first["accepted"] == bool(specert.accepts(target[0], draft[0], "greedy"))
    assert first["certified"] == (first["kl"] < first["certificate"])
    res = runner.invoke(main, ["certify", str(path / "t.safetensors")])
    assert res.exit_code == 0 and "topm:10&additive:0.6" in res.output and "certificate" in res.output.splitlines()[0]


@pytest.mark.parametrize("make, args, message", [
    (None, ["/no/such.npy"], "no such file"),
    ("scalar", [], "shape [..., V]"),
    ("one_token", [], "V >= 2"),
    ("txt", [], "unknown file type"),
    (None, ["--rule", "bogus"], "unknown rule"),
    ("mismatch", [], "--draft has shape"),
])
def test_certify_errors(files, make, args, message):
    path, target, _ = files
    argv = ["certify", str(path / "t.npy")]
    if make == "scalar":
        np.save(path / "s.npy", np.float32(1.0))
        argv = ["certify", str(path / "s.npy")]
    elif make == "one_token":
        np.save(path / "o.npy", np.zeros((2, 1), np.float32))
        argv = ["certify", str(path / "o.npy")]
    elif make == "txt":
        (path / "x.txt").write_text("1 2 3")
        argv = ["certify", str(path / "x.txt")]
    elif make == "mismatch":
        np.save(path / "m.npy", np.zeros((2, 40), np.float32))
        argv += ["--draft", str(path / "m.npy")]
    if args and args[0].startswith("/"):
        argv = ["certify", *args]
    else:
        argv += args
    res = CliRunner().invoke(main, argv)
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bench_prints_ratios():
    res = CliRunner().invoke(main, ["bench", "--kind", "normal", "--kind", "lm", "--batch", "4", "--vocab", "2000",
                                    "--repeat", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count("torch.logsumexp") == 2 and "all 12 rules in one call" in res.output
    assert "lm logits [4, 2000]" in res.output and "tree:8" in res.output


def test_bench_logits_of_each_kind():
    from specert.study.bench import bench_logits

    rows = torch.randn(5, 300) * 4
    for vocab in (100, 300, 700):
        x = bench_logits("model", 8, vocab, rows=rows)
        assert x.shape == (8, vocab) and x.dtype == torch.float32
        top = x.max(-1).values  # every row's top is one of the model's rows' top
        assert all(bool(torch.isclose(t, rows.max(-1).values).any()) for t in top)
    assert bench_logits("lm", 4, 50).std() > 2 * bench_logits("normal", 4, 50).std()


class _Terminal:
    """A stderr that says it is a terminal."""

    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_model_load_shows_its_wait_on_a_terminal_only(monkeypatch, capsys, terminal):
    from specert.decoding import model_specs

    monkeypatch.setattr(model_specs, "load_model", lambda spec: "loaded")
    stream = _Terminal()
    if terminal:
        monkeypatch.setattr("sys.stderr", stream)
    assert model_specs.load_with_progress("tiny", show=True) == "loaded"
    shown = "".join(stream.text) + capsys.readouterr().err
    assert ("loading the target tiny: done in" in shown) == terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_generate_shows_decoding_progress_on_a_terminal_only(tiny_chat_dir, monkeypatch, terminal):
    """The bar goes to stderr where it is a terminal (``_terminal``), and nothing does otherwise."""
    monkeypatch.setattr("specert.cli._terminal", lambda: terminal)
    res = CliRunner().invoke(main, ["generate", "--prompt", "Write a haiku", "--target", str(tiny_chat_dir),
                                    "--drafter", "ngram:3", "--k", "2", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert ("decoding" in res.stderr) == terminal
    assert "tokens/s" in res.stdout
