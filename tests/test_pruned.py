"""The pruned drafter (`specert distill --architecture pruned`): layer choice, quantization-aware healing lowers
held-out KL, what is served is what was trained, lossless decoding, refusal for other targets, and the pruned drafter
shipped for the embedded model."""

import json

import pytest
import torch

from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.decoding.quantized import fake_int4, int4_grid
from specert.drafters.pruned import load_pruned, shipped_pruned, student
from specert.drafters.spec import drafter_from_spec
from specert.train.data import load_cache
from specert.train.pruning import block_influence, layers_to_keep
from specert.train.training import held_out_report, run_distill
from tiny import tiny_model
from tiny_distill import assert_decodes_losslessly, small_config


@pytest.fixture(scope="module")
def pruned(tiny_chat_dir, chats):
    work = tiny_chat_dir.parent / "pruned-work"
    cfg = small_config(tiny_chat_dir, chats, architecture="pruned", drop=1, rank=4, steps=40)
    report = run_distill(cfg, work, work / "p.safetensors", progress=False)
    return cfg, work, report


def test_int4_grid_is_recovered_from_its_own_output():
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    q, d, low = int4_grid(w)
    f = fake_int4(w)
    assert (f - w).abs().max() <= d.max() / 2 + 1e-6
    q2, d2, low2 = int4_grid(f)
    assert torch.equal(q, q2)
    torch.testing.assert_close(fake_int4(f), f)


def test_block_influence_finds_a_layer_that_changes_nothing():
    model = tiny_model("llama", layers=4).model
    layer = model.model.layers[2]
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(model, [[1, 2, 3, 4, 5], [9, 8, 7]])
    assert float(bi[2]) == pytest.approx(0, abs=1e-12)
    assert (bi[[0, 1, 3]] > 1e-3).all()
    assert layers_to_keep(bi, 1) == (0, 1, 3)
    with pytest.raises(ValueError, match="drop must be between 1 and 3"):
        layers_to_keep(bi, 4)


@pytest.mark.slow  # trains a pruned drafter first (the module's fixture): about 13 s
def test_pruned_distillation_lowers_held_out_kl(pruned, tiny_chat_dir):
    cfg, work, report = pruned
    meta = json.loads((work / "meta.json").read_text())
    _, held = load_cache(meta, work)
    target = load_model(str(tiny_chat_dir))
    influence = torch.tensor(report["block_influence"])
    assert report["keep"] == [i for i in range(3) if i != int(influence.argmin())]
    cut = student(target.model, tuple(report["keep"]), cfg.rank).eval()  # B = 0: the cut target on its int4 grid
    before = held_out_report(cut, held, cfg)
    after = report["held_out"]
    assert after["kl/1"] < 0.8 * before["kl/1"]
    assert after["positions"] == before["positions"] > 0
    assert set(after) >= {"agree/1", "certified/1", "median_kl/1"} and "kl/2" not in after


@pytest.mark.slow  # trains a pruned drafter first (the module's fixture): about 13 s
def test_served_drafter_is_the_trained_one(pruned, tiny_chat_dir):
    """The int4 drafter (integer kernels, bfloat16 activations) computes what training optimised: the float model
    on the same grid."""
    _, work, _ = pruned
    target = load_model(str(tiny_chat_dir))
    trained = load_pruned(work / "p.safetensors", target, serve=False)
    drafter = drafter_from_spec(f"pruned:{work / 'p.safetensors'}", target)
    assert len(drafter.model.model.layers) == 2
    seq = [1, 9, 30, 400, 41, 9, 30, 77, 5, 300, 2000, 17]
    with torch.no_grad():
        ref = trained(torch.tensor([seq])).logits[0]
    got = drafter.score(seq, prompt=3)  # the prompt on float weights, the rest on the int4 kernels
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())
    untrained = student(target.model, tuple(trained.pruned_config.keep), trained.pruned_config.rank).eval()
    with torch.no_grad():
        assert float((untrained(torch.tensor([seq])).logits[0] - ref).abs().max()) > 0.05 * float(ref.abs().max())


@pytest.mark.slow  # trains a pruned drafter first (the module's fixture): about 13 s
@pytest.mark.parametrize("shape", [{"k": 4}, {"tree": "3,2,1"}, {"k": "auto:6"}])
def test_saved_pruned_drafter_decodes_losslessly(pruned, tiny_chat_dir, shape):
    _, work, _ = pruned
    target = load_model(str(tiny_chat_dir))
    assert_decodes_losslessly(target, drafter_from_spec(f"pruned:{work / 'p.safetensors'}", target), shape)


@pytest.mark.slow  # trains a pruned drafter first (the module's fixture): about 13 s
def test_pruned_drafter_for_another_target_is_refused(pruned, tiny_chat_dir, tmp_path):
    from safetensors.torch import save_file

    _, work, _ = pruned
    path = work / "p.safetensors"
    target = load_model(str(tiny_chat_dir))
    with pytest.raises(ValueError, match="trained for another target"):
        load_pruned(path, tiny_model("llama", seed=1, layers=3, vocab=target.vocab_size))
    with pytest.raises(ValueError, match="trained for a target with 49152 tokens, hidden size 64 and 3 layers"):
        load_pruned(path, tiny_model("llama"))
    with pytest.raises(ValueError, match="no pruned drafter file"):
        drafter_from_spec(f"pruned:{tmp_path / 'none.safetensors'}", target)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "head.safetensors"), metadata={"format": "specert-draft-head/1"})
    with pytest.raises(ValueError, match="not a specert pruned drafter.*use head:PATH"):
        load_pruned(tmp_path / "head.safetensors", target)
    with pytest.raises(ValueError, match="no pruned drafter ships for target"):
        drafter_from_spec("pruned", target)


@pytest.mark.slow  # trains a pruned drafter first (the module's fixture): about 13 s
def test_distill_cli_pruned(pruned, tiny_chat_dir, chats):
    from click.testing import CliRunner

    from specert.cli import main

    _, work, _ = pruned
    args = ["distill", "--target", str(tiny_chat_dir), "--data", str(chats), "--answers", "data", "--texts", "30",
            "--held-out", "6", "--max-tokens", "64", "--draft-vocab", "300", "--depths", "2", "--steps", "40",
            "--lr", "0.003", "--architecture", "pruned", "--drop", "1", "--rank", "4", "--work", str(work),
            "--out", str(work / "cli.safetensors")]
    res = CliRunner().invoke(main, args)  # the cache and the finished checkpoint are reused
    assert res.exit_code == 0, res.output
    assert "keeps layers" in res.output and "held-out depth 1: agreement" in res.output
    assert "held-out depth 2" not in res.output and f"--drafter pruned:{work / 'cli.safetensors'}" in res.output
    res = CliRunner().invoke(main, [*args[:-4], "--drop", "3", "--work", str(work / "other")])
    assert res.exit_code != 0 and "drop must be smaller than the target's 3 layers, got 3" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow  # the embedded model, loaded once per test run
def test_shipped_pruned_drafter_is_small_trained_and_exact(embedded):
    path = shipped_pruned(embedded)
    assert path.stat().st_size <= 20 * 2**20
    cfg = load_pruned(path, embedded, serve=False).pruned_config
    assert len(cfg.keep) == 26 and cfg.rank == 16 and cfg.trained.startswith("certified")
    ids = encode_prompt(embedded, "Explain in two sentences why the sky is blue.")
    base = generate(embedded, ids, max_new_tokens=40)
    drafter = drafter_from_spec("pruned", embedded)
    for shape in (dict(tree="3,2,1"), dict(k=4)):
        out = generate(embedded, ids, drafter, "greedy", max_new_tokens=40, trace=True, **shape)
        assert out.tokens == base.tokens, shape
        assert all(row.accepted for row in out.trace if row.certified)
    first = [row.accepted for row in out.trace if row.position == 0]  # the chain's first drafted tokens
    assert sum(first) / len(first) > 0.4  # measured 57% (12/21); a broken copy of the target drafts far from it
