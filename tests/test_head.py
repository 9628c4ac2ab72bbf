"""The draft head (specert.drafters.head), as distilled by the `trained` fixture: a saved head decodes losslessly,
drafts what it scores teacher-forced and what training unrolls, computes its certificate from its small logits, is
refused for other targets, and is scored by `specert eval`; the head shipped for the embedded model."""

import pytest
import torch

from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.drafters.head import load_head, save_head
from specert.drafters.spec import drafter_from_spec
from specert.train.objectives import unrolled
from tiny import tiny_model
from tiny_distill import assert_decodes_losslessly


@pytest.mark.parametrize("shape", [{"k": 4}, {"k": 1}, {"tree": "3,2,1"}, {"k": "auto:6"}, {"tree": "auto:8"}])
def test_saved_head_decodes_losslessly(trained, tiny_chat_dir, shape):
    _, work, _ = trained
    target = load_model(str(tiny_chat_dir))
    assert_decodes_losslessly(target, drafter_from_spec(f"head:{work / 'head.safetensors'}", target), shape)


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
    copy = drafter_from_spec(f"head:{path}", target).head  # saved again, it loads as the same head
    assert copy.cfg == head.cfg
    for (name, x), (_, y) in zip(head.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(x, y), name


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


@pytest.mark.slow  # the embedded model, loaded once per test run
def test_shipped_head_is_small_trained_and_exact(embedded):
    from specert.drafters.head import shipped_head

    assert shipped_head(embedded).stat().st_size <= 20 * 2**20
    ids = encode_prompt(embedded, "Explain in two sentences why the sky is blue.")
    base = generate(embedded, ids, max_new_tokens=40)
    out = generate(embedded, ids, drafter_from_spec("head", embedded), "greedy", k=4, max_new_tokens=40, trace=True)
    assert out.tokens == base.tokens
    first = [row.accepted for row in out.trace if row.position == 0]
    assert sum(first) / len(first) > 0.15  # measured 25% (8/32); an untrained head drafts outside the text
    assert all(row.accepted for row in out.trace if row.certified)
