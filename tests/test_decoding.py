"""The speculative decoder on tiny random Llama and Qwen3 models: exactness, rules, soundness, the room left for
drafts, and the lean forward path. The drafters, the trace and the draft head have their own test files."""

import numpy as np
import pytest
import torch

from reference import accepted_tokens, softmax
from specert.decoding.loop import generate
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.model import ModelDrafter, layer_skip_view, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.spec import drafter_from_spec
from specert.theory.rules import rule
from tiny import tiny_model

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42]
SHAPES = [dict(k=1), dict(k=3), dict(k=6), dict(tree="3,2,1"), dict(tree="2,2,2,2"), dict(k="auto"),
          dict(tree="auto:12"), dict(k="heuristic")]


def _drafters(target):
    other = tiny_model("llama" if "llama" in target.name else "qwen3", seed=2, layers=2)
    return [
        ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2"),
        NGramDrafter(2),
        model_drafter(other, target),
        ModelDrafter(target.model, "self"),  # the target itself: every draft is certified and accepted
        drafter_from_spec("int8", target),
        drafter_from_spec("int4", target),
    ]


# The fast run decodes with the first shapes of each kind (chains, trees, a certified one); the slow run adds the rest.
FAST_SHAPES = [dict(k=3), dict(tree="3,2,1"), dict(k="auto")]
EVERY_SHAPE = [pytest.param(FAST_SHAPES, id="fast"),
               pytest.param([s for s in SHAPES if s not in FAST_SHAPES], id="rest", marks=pytest.mark.slow)]


@pytest.mark.parametrize("shapes", EVERY_SHAPE)
def test_strict_greedy_reproduces_target_greedy(target, shapes):
    base = generate(target, PROMPT, max_new_tokens=40).tokens
    assert len(base) == 40
    for drafter in _drafters(target):
        for shape in shapes:
            out = generate(target, PROMPT, drafter, "greedy", max_new_tokens=40, **shape)
            assert out.tokens == base, (drafter.spec, shape)
        out = generate(target, PROMPT, drafter, "tree:3", max_new_tokens=40, tree="3,2")
        assert out.tokens == base


@pytest.mark.parametrize("shapes", EVERY_SHAPE)
def test_eos_and_max_new_tokens(target, shapes):
    base = generate(target, PROMPT, max_new_tokens=30).tokens
    eos = base[12]
    with_eos = tiny_model("llama" if "llama" in target.name else "qwen3", seed=1, eos=eos)
    stop = base.index(eos) + 1
    plain = generate(with_eos, PROMPT, max_new_tokens=30).tokens
    assert plain == base[:stop]
    for drafter in _drafters(with_eos):
        for shape in shapes:
            assert generate(with_eos, PROMPT, drafter, max_new_tokens=30, **shape).tokens == base[:stop]
            assert generate(with_eos, PROMPT, drafter, max_new_tokens=7, **shape).tokens == base[:7]


def test_the_self_drafter_accepts_everything_and_is_certified(target):
    out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=30, k=4, trace=True)
    m = SpecDecodeMetrics()
    m.observe(out)
    assert m.mean_acceptance_length > 4  # every draft accepted: 5 tokens per forward (bonus included)
    assert m.certified_positions == m.traced_positions > 0
    assert m.soundness_violations == 0


@pytest.mark.parametrize("spec", ["additive:0.3", "multiplicative:0.1", "topm:3", "typical:0.09,0.3",
                                  "topm:10&additive:0.6"])
def test_relaxed_rules_accept_only_what_they_accept(target, spec):
    """Every emitted token at a traced position is either the target's greedy token or one the rule accepts
    (judged by the reference implementation of the rule), and a rejected draft is never emitted."""
    r = rule(spec)
    for drafter in _drafters(target)[:3]:
        for shape in (dict(k=4), dict(tree="3,2")):
            out = generate(target, PROMPT, drafter, r, max_new_tokens=30, trace=True, **shape)
            assert out.trace
            m = SpecDecodeMetrics()
            m.observe(out)
            assert m.soundness_violations == 0
            for row in out.trace:
                if row.accepted:
                    assert row.emitted_token in row.draft_tokens
                else:
                    assert row.emitted_token == row.target_token
            # re-derive p at each traced position from a plain forward of the generated text
            full = torch.tensor([PROMPT + out.tokens])
            with torch.no_grad():
                logits = target.model(full).logits[0]
            for row in out.trace:
                p = softmax(logits[len(PROMPT) - 1 + row.token_index].numpy())
                ok = accepted_tokens(p, r)
                if row.accepted:
                    assert ok[row.emitted_token], (spec, drafter.spec, row)
                else:
                    assert not ok[row.draft_tokens].any(), (spec, drafter.spec, row)


def test_relaxed_rule_accepts_more_than_greedy(target):
    drafter = ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2")
    m_greedy, m_relaxed = SpecDecodeMetrics(), SpecDecodeMetrics()
    m_greedy.observe(generate(target, PROMPT, drafter, "greedy", max_new_tokens=40, k=4))
    m_relaxed.observe(generate(target, PROMPT, drafter, "topm:8", max_new_tokens=40, k=4))
    assert m_relaxed.mean_acceptance_length >= m_greedy.mean_acceptance_length


def test_drafts_never_exceed_the_room_left(target):
    """No step drafts more tokens than max_new_tokens can still take (the bonus token comes free)."""
    for shape in (dict(k=8), dict(k="auto"), dict(k="heuristic:8")):
        out = generate(target, PROMPT, ModelDrafter(target.model, "self"), max_new_tokens=11, **shape)
        assert out.tokens == generate(target, PROMPT, max_new_tokens=11).tokens
        produced = 0
        for drafted, accepted in zip(out.drafted, out.accepted):
            assert drafted <= 11 - produced - 1
            produced += accepted + 1
        assert out.drafted == ([10] if shape == dict(k="auto") else [8, 1])  # self-drafts are all accepted


class TestBadInput:
    def test_prompt_and_budget(self, target):
        with pytest.raises(ValueError, match="empty"):
            generate(target, [], max_new_tokens=4)
        with pytest.raises(ValueError, match="exceed the context"):
            generate(target, list(range(10)), max_new_tokens=600)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_step_is_transformers_forward(arch, monkeypatch):
    """The lean path (one token, a causal run of a few, a tree under a mask), which :func:`forward_features` takes
    after a non-empty cache, runs the same modules as transformers' forward: same logits, hidden states and cache."""
    import specert.decoding.forward as models
    from specert.decoding.drafts import ancestors
    from specert.decoding.quantized import quantized_copy

    def transformers_forward(model, cache, tokens, positions=None, attend=None, layers=()):
        with monkeypatch.context() as m:
            m.setattr(models, "can_step", lambda model: False)
            return models.forward_features(model, cache, tokens, layers, positions, attend)

    target = tiny_model(arch, seed=6)
    past = len(PROMPT) - 1
    tree = [-1, -1, 0, 0, 1]  # the root (the context's last token) and 5 drafted nodes
    attend = torch.zeros(6, past + 6, dtype=torch.bool)
    attend[:, : past + 1] = True
    attend[1:, past + 1 :] = ancestors(tree)
    positions = [past] + [past + 1 + d for d in (0, 0, 1, 1, 1)]
    runs = [([PROMPT[-1]], None, None), ([PROMPT[-1], 8, 9], None, None),
            ([PROMPT[-1], 11, 12, 13, 14, 15], positions, attend)]
    view = layer_skip_view(target.model, 2)
    quantized = quantized_copy(target.model, 4)
    assert hasattr(quantized.model.layers[0].self_attn, "qkv")  # the lean path runs its fused products
    for model in (target.model, quantized, view):
        assert models.can_step(model)
        # the embeddings, a layer's output, the final states (hidden states are read from targets, not views)
        layers = (0, 1, model.config.num_hidden_layers) if model is not view else ()
        for tokens, where, mask in runs:
            a, b = models.new_cache(model), models.new_cache(model)
            transformers_forward(model, a, PROMPT[:-1])
            transformers_forward(model, b, PROMPT[:-1])
            ref, ref_states = transformers_forward(model, a, tokens, where, mask, layers)
            got, states = models.forward_features(model, b, tokens, layers, where, mask)
            assert got.shape == ref.shape == (len(tokens), target.vocab_size)
            assert torch.allclose(got, ref, atol=1e-6 * float(ref.abs().max()))
            if layers:
                assert states.shape == ref_states.shape == (len(tokens), 3 * model.config.hidden_size)
                assert torch.allclose(states, ref_states, atol=1e-6 * float(ref_states.abs().max()))
            assert torch.equal(models.forward(model, models.new_cache(model), PROMPT), models.forward_features(
                model, models.new_cache(model), PROMPT, ())[0])  # an empty cache: transformers' own forward
            for x, y in zip(a.layers, b.layers):
                assert torch.allclose(x.keys, y.keys) and torch.allclose(x.values, y.values)
    assert not models.can_step(torch.nn.Linear(2, 2))


def test_argmax_is_torchs_argmax():
    """tensors.argmax (numpy's, for speed) picks what torch's argmax picks: rows and single rows, float32, float64
    and bfloat16, the first index on ties, -inf masks."""
    from specert.theory.tensors import argmax

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(6, 49152)), dtype=torch.float32)
    x[1, 7] = x[1, 300] = x[1].max() + 1  # a tie: the first index
    x[2, :100] = float("-inf")
    for values in (x, x.double(), x.bfloat16(), x[1], x[2].double()):
        assert torch.equal(argmax(values), values.argmax(-1))
    assert int(argmax(x[1])) == 7
