"""The embedded SmolLM2-135M: chat prompts, exact greedy speculative decoding, the generate CLI."""

import pytest
from click.testing import CliRunner

from specert.cli import main
from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.spec import drafter_from_spec

pytestmark = pytest.mark.slow  # the embedded model, loaded once per test run


def test_chat_template_and_context(embedded):
    ids = encode_prompt(embedded, "What is the capital of France?")
    assert embedded.tokenizer.decode(ids).count("<|im_start|>") >= 2  # system + user turns
    with pytest.raises(ValueError, match="context"):
        encode_prompt(embedded, "word " * 10000)
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(embedded, "  ")


def test_greedy_speculative_output_is_the_targets_own(embedded):
    ids = encode_prompt(embedded, "List three colours of the rainbow.")
    base = generate(embedded, ids, max_new_tokens=24)
    for spec in ["ngram:3", "layerskip:12", "int4", "head"]:
        drafter = drafter_from_spec(spec, embedded)
        for shape in (dict(k=4), dict(tree="3,2,1")):
            out = generate(embedded, ids, drafter, "greedy", max_new_tokens=24, trace=True, **shape)
            assert out.tokens == base.tokens, (spec, shape)
            m = SpecDecodeMetrics()
            m.observe(out)
            assert m.soundness_violations == 0


def test_eos_stops_generation(embedded):
    ids = encode_prompt(embedded, "Say just the word yes.")
    out = generate(embedded, ids, drafter_from_spec("ngram:2", embedded), max_new_tokens=64)
    assert out.tokens[-1] in embedded.eos_token_ids and len(out.tokens) < 64


def test_generate_cli(embedded, tmp_path):
    runner = CliRunner()
    trace = tmp_path / "t.parquet"
    res = runner.invoke(main, ["generate", "--prompt", "Name a fruit.", "--drafter", "layerskip:20", "--k", "2",
                               "--max-new-tokens", "12", "--compare", "--trace", str(trace)])
    assert res.exit_code == 0, res.output
    assert "mean acceptance length" in res.output and "speedup" in res.output and "identical to" in res.output
    assert trace.exists()
    res = runner.invoke(main, ["generate", "--prompt", "Name a fruit.", "--max-new-tokens", "12"])
    assert res.exit_code == 0 and "drafter int4 | rule greedy | k=3" in res.output, res.output
    res = runner.invoke(main, ["generate", "--prompt", "Name a fruit.", "--drafter", "compiled:int4",
                               "--max-new-tokens", "24", "--compare"])
    assert res.exit_code == 0 and "drafter compiled:int4 | rule greedy | k=auto" in res.output, res.output
    assert "identical to" in res.output
    for args, message in [(["--prompt", ""], "empty"), (["--prompt", "x", "--k", "0"], ">= 1"),
                          (["--prompt", "x", "--rule", "bogus"], "unknown rule"),
                          (["--prompt", "x", "--drafter", "nope:1"], "unknown drafter spec"),
                          (["--prompt", "word " * 10000], "context")]:
        res = runner.invoke(main, ["generate", *args])
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output
