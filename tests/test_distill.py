"""`specert distill` and draft heads: training lowers held-out KL, resumes exactly, and a saved head decodes
losslessly; heads of other targets are refused."""

import json

import pytest
import torch

from specert.decoding.loop import generate
from specert.decoding.models import load_model
from specert.drafters.head import HeadDrafter, load_head, save_head
from specert.drafters.spec import drafter_from_spec
from specert.train.config import DistillConfig
from specert.train.data import Texts, build_cache, load_cache, prepare
from specert.train.objectives import REACHABLE_TAU, depth_mask, head_losses, unrolled
from specert.train.training import held_out_report, new_head, run_distill, train
from tiny import tiny_model

CHATS = [
    [{"role": "user", "content": f"Count from {i} to {i + 9} and say why numbers matter."},
     {"role": "assistant", "content": " ".join(str(j) for j in range(i, i + 10)) + ". Numbers let us measure."}]
    for i in range(40)
]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CHATS) + "\n" + json.dumps("plain text too") + "\n")
    return path


def small_config(tiny_chat_dir, chats, **kw):
    base = dict(target=str(tiny_chat_dir), data=str(chats), answers="data", texts=30, held_out=6, max_tokens=64,
                draft_vocab=300, depths=2, steps=40, batch_size=4, lr=3e-3, save_every=10)
    return DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_chat_dir, chats, tmp_path_factory):
    work = tmp_path_factory.mktemp("distill")
    cfg = small_config(tiny_chat_dir, chats)
    report = run_distill(cfg, work, work / "head.safetensors", progress=False)
    return cfg, work, report


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


@pytest.mark.parametrize("shape", [{"k": 4}, {"k": 1}, {"tree": "3,2,1"}, {"k": "auto:6"}, {"tree": "auto:8"}])
def test_saved_head_decodes_losslessly(trained, tiny_chat_dir, shape):
    _, work, _ = trained
    target = load_model(str(tiny_chat_dir))
    assert_decodes_losslessly(target, drafter_from_spec(f"head:{work / 'head.safetensors'}", target), shape)


def assert_decodes_losslessly(target, drafter, shape):
    """Strict greedy with ``drafter`` in ``shape`` gives the target's own greedy tokens; certified steps accepted."""
    for prompt in ([5, 17, 300, 2000, 17, 300], [7]):
        expected = generate(target, prompt, None, max_new_tokens=30, stop_at_eos=False).tokens
        got = generate(target, prompt, drafter, "greedy", max_new_tokens=30, stop_at_eos=False, trace=True, **shape)
        assert got.tokens == expected
        assert all(row.accepted for row in got.trace if row.kl < row.certificate)


def test_head_proposal_matches_teacher_forcing_and_training_passes(trained, tiny_chat_dir):
    """The decoder's incremental drafting, the teacher-forced score and the training-time test agree."""
    _, work, _ = trained
    target = load_model(str(tiny_chat_dir))
    drafter = drafter_from_spec(f"head:{work / 'head.safetensors'}", target)
    head = drafter.head
    seq = [1, 9, 30, 400, 41, 9, 30, 77, 5]
    with torch.no_grad():
        out = target.model(torch.tensor([seq]), output_hidden_states=True)
    states = torch.cat([out.hidden_states[i][0] for i in head.cfg.feature_layers], -1)  # [T, nl * H]
    scored = drafter.score(seq, states)  # row t predicts token t+1
    from specert.decoding.schedules import FixedSchedule

    for n in (2, 5, 8):  # context seq[:n + 1]: the target holds n states
        drafter.target_ran(0, states[:n])
        tree = drafter.propose(seq[: n + 1], FixedSchedule([1]))
        torch.testing.assert_close(tree.logits[0], scored[n], rtol=1e-5, atol=1e-5)
    # depth 2 of the training passes = a drafted token after a real context, with the true token drafted
    feats = states.half().float()[None]
    g1, g2 = list(unrolled(head, feats, torch.tensor([seq]), 2))
    n = 5
    with torch.no_grad():
        g, k, v = head.run(head.fuse(feats[:, :n]), torch.tensor([seq[1 : n + 1]]), torch.arange(n))
        deep, _, _ = head.run(g[:, -1:], torch.tensor([[seq[n + 1]]]), torch.tensor([n]), k, v)
    torch.testing.assert_close(g2[0, n], deep[0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[0, n - 1], g[0, -1], rtol=1e-5, atol=1e-5)


def test_head_certificate_from_its_small_logits(trained, tiny_chat_dir):
    """The head's D_q(1) from its [S + 1] small logits is that of its distribution over the whole vocabulary
    whenever each of the rest's tokens is below its two largest draft logits (even when the rest's mass is not), and
    is left to the caller (None) otherwise."""
    from specert.theory.certificates import top1_certificates

    _, work, _ = trained
    head = load_head(work / "head.safetensors", load_model(str(tiny_chat_dir)))
    gen = torch.Generator().manual_seed(3)
    size = len(head.vocab) + 1
    answered = 0
    m = head.log_others  # the rest's tokens each have the logit small[-1] - m
    for scale, rest in [(1.0, -5.0), (4.0, 0.0), (0.3, m + 0.5), (8.0, 3.0), (1.0, m + 6.0), (0.05, m)]:
        for _ in range(20):
            small = torch.randn(size, generator=gen) * scale
            small[-1] = rest + torch.randn(1, generator=gen).item()
            full = float(top1_certificates(head.full_logits(small)[None]))
            got = head.certificate(small)
            if int((small[:-1] > small[-1] - head.log_others).sum()) >= 2:
                answered += 1
                assert got == pytest.approx(full, rel=1e-5, abs=1e-7)
            else:
                assert got is None
    assert 60 < answered < 120  # both cases were exercised


def test_depth_mask():
    m = depth_mask(4, 2).int().tolist()  # query t sees real keys s <= t - 1 and its own pass-2 key
    assert m == [[0, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 0],
                 [1, 1, 1, 0, 0, 0, 0, 1]]


def test_head_for_another_target_is_refused(trained, tiny_chat_dir, tmp_path):
    _, work, _ = trained
    target = load_model(str(tiny_chat_dir))
    head = load_head(work / "head.safetensors", target)
    other = tiny_model("llama", seed=1, vocab=target.vocab_size)
    with pytest.raises(ValueError, match="trained for another target"):
        load_head(work / "head.safetensors", other)
    with pytest.raises(ValueError, match="trained for a target with 49152 tokens"):
        load_head(work / "head.safetensors", tiny_model("llama"))
    with pytest.raises(ValueError, match="no draft head file"):
        drafter_from_spec(f"head:{tmp_path / 'none.safetensors'}", target)
    (tmp_path / "bad.safetensors").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="is not a draft head"):
        load_head(tmp_path / "bad.safetensors", target)
    with pytest.raises(ValueError, match="no draft head ships for target"):
        drafter_from_spec("head", target)
    path = save_head(head, tmp_path / "copy.safetensors")
    assert isinstance(drafter_from_spec(f"head:{path}", target), HeadDrafter)


def test_eval_teacher_forces_a_head(trained, tiny_chat_dir):
    from specert.study.evaluation import EvalConfig, drafter_part

    _, work, _ = trained
    target = load_model(str(tiny_chat_dir))
    spec = f"head:{work / 'head.safetensors'}"
    cfg = EvalConfig(target=str(tiny_chat_dir), rules=("greedy",), drafters=(spec,))
    prompt, greedy = [5, 17, 300, 2000], generate(target, [5, 17, 300, 2000], None, max_new_tokens=6).tokens
    table = drafter_part(target, spec, drafter_from_spec(spec, target), [prompt], [greedy], [0], cfg).to_pydict()
    assert len(table["kl"]) == len(greedy) and all(k >= 0 for k in table["kl"])
    assert table["certified:greedy"] == [k < c for k, c in zip(table["kl"], table["cert:greedy"])]


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
