"""`specert select` on a tiny chat model: measurements, the quality constraint, a recommendation that
`specert generate` accepts as given."""

import json
import shlex

import pytest
from click.testing import CliRunner

from conftest import SPEC_BENCH
from specert.cli import main
from specert.study.selection import SelectConfig, run_select


def test_select_recommends_a_configuration_generate_accepts(tiny_chat_dir, tmp_path):
    cfg = SelectConfig(target=str(tiny_chat_dir), prompts=str(SPEC_BENCH), num_prompts=3, steps=12,
                       drafters=("ngram:2", "layerskip:2"), rules=("greedy", "topm:8"), shapes=("k=3", "k=auto"),
                       min_agreement=1.0)
    result = run_select(cfg, tmp_path / "sel", progress=False)
    assert len(result["candidates"]) == 2 * 2 * 2
    for name in ("selection.json", "selection.md", "selection.png"):
        assert (tmp_path / "sel" / name).is_file()
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["recommendation"] == result["recommendation"]
    for row in result["candidates"]:
        assert row["meets_quality"] == (row["agreement"] >= 1.0)
        assert row["soundness_violations"] == 0
        if row["rule"] == "greedy":
            assert row["agreement"] == 1.0  # strict greedy is exact
    best = result["recommendation"]
    assert best is not None and best["agreement"] >= 1.0
    assert best["speedup"] == max(r["speedup"] for r in result["candidates"] if r["meets_quality"])
    res = CliRunner().invoke(main, ["generate", "--prompt", "Hello there", "--max-new-tokens", "6",
                                    *shlex.split(best["generate_options"])])
    assert res.exit_code == 0, res.output
    assert set(result["drafters"]) == {"ngram:2", "layerskip:2"}


@pytest.mark.parametrize("args, message", [(["--shape", "k=0"], ">= 1"), (["--shape", "x=1"], "write k=N"),
                                           (["--min-agreement", "2"], "min-agreement"),
                                           (["--drafter", "nope"], "unknown drafter spec")])
def test_select_cli_errors(args, message, tmp_path):
    res = CliRunner().invoke(main, ["select", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
