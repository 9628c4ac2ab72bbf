"""`specert distill` (specert.train): training lowers held-out KL, self-distillation texts are the target's own
answers, training resumes exactly, the objectives and their certificate terms, and the command line. The heads it
trains are tested in test_head.py."""

import json

import pytest
import torch

from specert.decoding.loop import generate
from specert.decoding.models import load_model
from specert.drafters.head import load_head
from specert.train.data import Texts, build_cache, load_cache, prepare
from specert.train.objectives import REACHABLE_TAU, depth_mask, head_losses
from specert.train.training import held_out_report, new_head, run_distill, train
from tiny_distill import CHATS, small_config


def test_distillation_lowers_held_out_kl(trained, tiny_chat_dir):
    cfg, work, report = trained
    meta = json.loads((work / "meta.json").read_text())
    _, held = load_cache(meta, work)
    untrained = new_head(cfg, load_model(str(tiny_chat_dir)), meta["vocab"], cfg.seed).eval()
    before = held_out_report(untrained, held, cfg)
    after = report["held_out"]
    assert after["kl/1"] < 0.7 * before["kl/1"]
    assert after["kl/2"] < 0.7 * before["kl/2"]
    assert after["positions"] == before["positions"] > 0


def test_self_distillation_texts_are_the_targets_greedy_answers(tiny_chat_dir, chats, tmp_path):
    """answers="target": each text is a first user turn through the chat template followed by the target's own
    greedy answer (as the decoder produces it), cut at max_tokens; a lost answers part is regenerated identically."""
    from specert.decoding.models import encode_prompt

    cfg = small_config(tiny_chat_dir, chats, answers="target", texts=8, held_out=2, max_tokens=96)
    loaded = load_model(str(tiny_chat_dir))
    meta = prepare(cfg, loaded, tmp_path, progress=False)
    texts = meta["held_out"] + meta["train"]
    assert len(texts) == 10 and all(len(t) <= 96 for t in texts)
    firsts = {tuple(encode_prompt(loaded, c[:1])) for c in CHATS}
    for text in texts[:3]:
        prompt = next(list(p) for p in firsts if tuple(text[: len(p)]) == p)
        answer = generate(loaded, prompt, None, max_new_tokens=96 - len(prompt)).tokens
        assert text == prompt + answer
    parts = sorted((tmp_path / "answers").glob("part-*.json"))
    kept = parts[0].read_text()
    parts[0].unlink()
    (tmp_path / "meta.json").unlink()
    assert prepare(cfg, loaded, tmp_path, progress=False) == meta
    assert parts[0].read_text() == kept
    with pytest.raises(ValueError, match="answers must be one of"):
        small_config(tiny_chat_dir, chats, answers="model").validate()


class Interrupted(Texts):
    """Training texts whose 7th batch is never read: a run stopped by Ctrl-C during its 7th step."""

    def batch(self, which):
        self.read = getattr(self, "read", 0) + 1
        if self.read == 7:
            raise KeyboardInterrupt
        return super().batch(which)


def test_training_resumes_exactly(tiny_chat_dir, chats, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    cfg = small_config(tiny_chat_dir, chats, steps=12, save_every=4)
    run_distill(cfg, full, full / "h.safetensors", False)  # validates cfg and fills in its feature layers
    target = load_model(str(tiny_chat_dir))
    meta = prepare(cfg, target, cut, progress=False)
    build_cache(cfg, target, meta, cut, progress=False)
    texts, _ = load_cache(meta, cut)
    with pytest.raises(KeyboardInterrupt):  # after 6 steps, 4 of them checkpointed
        train(cfg, target, meta, Interrupted(texts.fields, texts.offsets, texts.lengths), cut, progress=False)
    assert torch.load(cut / "certified" / "checkpoint.pt", weights_only=False)["step"] == 4
    run_distill(small_config(tiny_chat_dir, chats, steps=12, save_every=4), cut, cut / "h.safetensors", False)
    target = load_model(str(tiny_chat_dir))
    a, b = load_head(full / "h.safetensors", target), load_head(cut / "h.safetensors", target)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_objectives_differ_and_are_checked(tiny_chat_dir, chats, trained):
    cfg, work, _ = trained
    with pytest.raises(ValueError, match="objective must be one of"):
        run_distill(small_config(tiny_chat_dir, chats, objective="mse"), work, work / "x.safetensors", False)
    with pytest.raises(ValueError, match="cache built with other options.*max_tokens"):
        run_distill(small_config(tiny_chat_dir, chats, max_tokens=32), work, work / "x.safetensors", False)
    with pytest.raises(ValueError, match="feature layers must lie in 0..3 and end with 3"):
        run_distill(small_config(tiny_chat_dir, chats, feature_layers=(1, 2)), work, work / "x.safetensors", False)


def test_certificate_terms_of_the_objectives(trained):
    """certified adds lambda * mean relu(KL - C_p); reachable adds lambda * mean sigmoid(log(KL / C_p) / tau)."""
    from dataclasses import replace

    cfg, work, _ = trained
    meta = json.loads((work / "meta.json").read_text())
    train_texts, _ = load_cache(meta, work)
    head = load_head(work / "head.safetensors", load_model(cfg.target))
    batch = train_texts.batch([0, 1, 2])
    one = replace(cfg, depths=1, hinge=3.0)
    cert = batch["certificate"][:, 1:][batch["valid"][:, 1:]].double()
    with torch.no_grad():
        plain = head_losses(head, batch, replace(one, objective="kl"))
        kl = plain["kl_entries"].double()
        assert float(plain["loss"]) == pytest.approx(float(kl.mean()), rel=1e-5)
        hinge = head_losses(head, batch, replace(one, objective="certified"))["loss"] - plain["loss"]
        assert float(hinge) == pytest.approx(3.0 * float((kl - cert).clamp(min=0).mean()), rel=1e-4, abs=1e-6)
        soft = head_losses(head, batch, replace(one, objective="reachable"))["loss"] - plain["loss"]
        expected = torch.sigmoid((kl.log() - cert.clamp(min=1e-12).log()) / REACHABLE_TAU).mean()
        assert float(soft) == pytest.approx(3.0 * float(expected), rel=1e-4, abs=1e-6)
    assert 0 < float(expected) < 1


def test_depth_mask():
    m = depth_mask(4, 2).int().tolist()  # query t sees real keys s <= t - 1 and its own pass-2 key
    assert m == [[0, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 0],
                 [1, 1, 1, 0, 0, 0, 0, 1]]


def test_distill_cli(trained, tiny_chat_dir, chats):
    from click.testing import CliRunner

    from specert.cli import main

    _, work, _ = trained
    args = ["distill", "--target", str(tiny_chat_dir), "--data", str(chats), "--answers", "data", "--texts", "30",
            "--held-out", "6", "--max-tokens", "64", "--draft-vocab", "300", "--depths", "2", "--steps", "40",
            "--lr", "0.003", "--work", str(work), "--out", str(work / "cli.safetensors")]
    res = CliRunner().invoke(main, args)  # the cache and the finished checkpoint are reused
    assert res.exit_code == 0, res.output
    assert "held-out depth 2: agreement" in res.output and (work / "cli.safetensors").is_file()
    for extra, message in [(["--layers", "a,b"], "--layers takes comma-separated"),
                           (["--depths", "0"], "Invalid value for '--depths': 0 is not in the range x>=1"),
                           (["--data", str(work / "none.jsonl")], "no such training text file")]:
        res = CliRunner().invoke(main, [*args[:-4], "--work", str(work / "other"), *extra])
        assert res.exit_code != 0 and message in res.output, (extra, res.output)
        assert "Traceback" not in res.output
