"""The drafter's step over a static KV cache, eager and compiled (specert.decoding.static_cache)."""

import pytest
import torch

import specert.decoding.schedules as schedules
from specert.decoding.forward import forward, keep_cache, new_cache
from specert.decoding.loop import generate
from specert.decoding.static_cache import StaticCache
from specert.drafters.spec import drafter_from_spec
from specert.theory.certificates import drafter_certificate
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_cache_runs_like_the_dynamic_cache(arch):
    """Run eagerly, the static layout gives transformers' cache's logits: a prompt, steps of 1-3 tokens past its
    first capacity (it grows), a crop to an accepted prefix, a tree level (shared positions, ancestor mask) and a
    kept tree path moved into place."""
    model = tiny_model(arch, seed=3).model
    static, dynamic = StaticCache(model, capacity=16), new_cache(model)  # its default step: eager

    def same(tokens, positions=None, attend=None):
        got = static.forward(tokens, positions, attend)
        want = forward(model, dynamic, tokens, positions, attend)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert static.get_seq_length() == dynamic.get_seq_length()
        assert static.certificate == float(drafter_certificate(got[-1], 1))  # D_q(1) of the last row, with it

    same(list(range(3, 15)))
    for tokens in ([7], [8, 9], [10, 11, 12], [13]):
        same(tokens)
    assert static.capacity > 16
    static.keep(16, [])
    keep_cache(dynamic, 16, [])
    same([20, 21])
    past = static.length  # a tree level of two siblings at the same depth, each seeing the context and itself
    attend = torch.zeros(2, past + 2, dtype=torch.bool)
    attend[:, :past] = True
    attend[:, past:] = torch.eye(2, dtype=torch.bool)
    same([30, 31], [past, past], attend)
    static.keep(past, [past + 1])  # the second sibling was accepted
    keep_cache(dynamic, past, [past + 1])
    same([40])


def test_static_cache_loads_a_prefill():
    """A drafter made of the target's layers starts from the target's prefilled cache."""
    model = tiny_model("llama", seed=3).model
    dynamic = new_cache(model)
    forward(model, dynamic, list(range(3, 40)))
    static = StaticCache(model, capacity=8)
    static.load(dynamic)
    assert static.length == 37 and static.capacity >= 37
    for i, layer in enumerate(dynamic.layers):
        assert torch.equal(static.keys[i][:, :, :37], layer.keys)
        assert torch.equal(static.values[i][:, :, :37], layer.values)


@pytest.mark.parametrize("shape", [{"k": 3}, {"tree": "2,1"}, {"k": "auto"}])
def test_compiled_drafter_decodes_losslessly(shape):
    """``compiled:int4``, its step compiled by torch.compile, gives the target's own greedy tokens under strict
    greedy in chain and tree mode, and compiles nothing after its warm-up (token counts, lengths and positions are
    dynamic: a recompilation inside a generation would cost it seconds)."""
    target = tiny_model("llama", seed=0)
    drafter = drafter_from_spec("compiled:int4", target)
    assert isinstance(drafter.cache, StaticCache) and drafter.spec == "compiled:int4"
    accepted = 0
    for prompt in ([5, 17, 30, 200, 17, 30], [7]):
        expected = generate(target, prompt, None, max_new_tokens=30, stop_at_eos=False).tokens
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = generate(target, prompt, drafter, "greedy", max_new_tokens=30, stop_at_eos=False, **shape)
        assert got.tokens == expected
        accepted += sum(got.accepted)
    # a near copy of the target: its drafts are accepted (k=auto, with nothing measured yet, drafts a chain at its
    # first step)
    assert accepted > 0


def test_a_failed_compilation_says_what_to_do():
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    static = StaticCache(tiny_model("llama", seed=0).model, step=broken)  # a step that fails as inductor would
    with pytest.raises(ValueError, match="C\\+\\+ compiler.*drop 'compiled:'"):
        static.warm_up()


def test_compiled_cache_grows_without_compiling_again():
    """Past its capacity the cache reallocates larger buffers; the compiled step takes them as they are (the
    capacity is a dynamic size), and gives the eager step's logits and D_q(1) of their last row."""
    model = tiny_model("llama", seed=3).model
    static, dynamic = StaticCache(model, capacity=8), new_cache(model)
    static.warm_up()
    torch.testing.assert_close(static.forward(list(range(3, 9))), forward(model, dynamic, list(range(3, 9))))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in ([7], [8, 9], [10, 11, 12], [13]):
            logits = static.forward(tokens)
            torch.testing.assert_close(logits, forward(model, dynamic, tokens), rtol=1e-5, atol=1e-5)
            assert static.certificate == pytest.approx(float(drafter_certificate(logits[-1], 1)), rel=1e-4)
    assert static.capacity > 8 and static.length == dynamic.get_seq_length()


def test_a_certified_chain_reads_the_compiled_steps_certificate(monkeypatch):
    """Under k=auto a compiled drafter hands the schedule D_q(1) of each drafted position, computed in its step: it
    is that of the logits the schedule is given (the frontier's row is the latest forward's last row)."""
    target = tiny_model("llama", seed=0)
    drafter = drafter_from_spec("compiled:int4", target)
    seen, chain_width = [], schedules.CertifiedSchedule._chain_width

    def spy(self, depth, q, certificate, guess):
        seen.append((certificate, float(drafter_certificate(q, 1))))
        return chain_width(self, depth, q, certificate, guess)

    monkeypatch.setattr(schedules.CertifiedSchedule, "_chain_width", spy)
    generate(target, [5, 17, 30, 200, 17, 30], drafter, max_new_tokens=30, stop_at_eos=False, k="auto")
    assert len(seen) > 10
    for given, own in seen:
        assert given == pytest.approx(own, rel=1e-4, abs=1e-9)
