"""Weight-only quantized copies of a model (specert.decoding.quantized): the grids, the shared weights, the drafters."""

import pytest
import torch

from specert.decoding.forward import forward, new_cache
from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt
from specert.decoding.quantized import PREFILL_ROWS, Int4Linear, Int8Linear, quantized_copy
from specert.drafters.spec import drafter_from_spec
from tiny import tiny_model


def _q41_linear(out_features=48, in_features=96, seed=0):
    """A Linear whose weight lies on a Q4_1 grid: groups of 32 with w = d * q + m."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans its grid, as a Q4_1 quantizer leaves it
    d = torch.rand(out_features, in_features // 32, 1, generator=g) * 0.1 + 0.01
    m = -torch.rand(out_features, in_features // 32, 1, generator=g)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = (d * q + m).view(out_features, in_features)
    return linear


def test_int4_recovers_a_q4_1_grid_up_to_bfloat16_activations():
    linear = _q41_linear()
    x = torch.randn(3, 96)
    ref = torch.nn.functional.linear(x.bfloat16().float(), linear.weight)  # the weights exact, x rounded
    y = Int4Linear(linear)(x)
    assert y.dtype == x.dtype and y.shape == (3, 48)
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    # off the grid each weight moves by up to half a group's step: a visibly larger error
    off = torch.nn.Linear(96, 48, bias=False)
    off.weight.data = linear.weight.data + 0.02 * torch.randn(48, 96)
    ref_off = torch.nn.functional.linear(x.bfloat16().float(), off.weight)
    assert (Int4Linear(off)(x) - ref_off).abs().max() > 2 * (y - ref).abs().max()


def test_int8_rows_and_prompt_rows():
    linear = torch.nn.Linear(64, 40)
    x = torch.randn(2, 64)
    ref = linear(x.bfloat16().float())
    step = linear.weight.abs().amax(1) / 127  # per-row grid step
    bound = 0.5 * (x.abs().sum(-1, keepdim=True) * step) + 0.02 * ref.abs().max()
    assert ((Int8Linear(linear)(x) - ref).abs() <= bound).all()
    # a prompt (PREFILL_ROWS rows or more) runs on the shared float weight: exactly the float layer
    long = torch.randn(PREFILL_ROWS, 64)
    for layer in (Int8Linear(linear), Int4Linear(_q41_linear(48, 64))):
        w = layer.float_weight
        assert torch.equal(layer(long), torch.nn.functional.linear(long, w, layer.bias))


def test_copy_shares_float_weights_and_leaves_the_model_alone():
    target = tiny_model("llama", seed=3)
    before = forward(target.model, new_cache(target.model), [1, 2, 3])
    copy4 = quantized_copy(target.model, 4)
    assert isinstance(copy4.lm_head, Int8Linear)  # 4 bits on the LM head cost the most agreement
    assert isinstance(copy4.model.layers[0].mlp.up_proj, Int4Linear)
    assert copy4.model.layers[0].mlp.up_proj.float_weight is target.model.model.layers[0].mlp.up_proj.weight
    assert all(isinstance(m, torch.nn.Linear) for m in target.model.modules() if "proj" in type(m).__name__.lower())
    assert isinstance(target.model.lm_head, torch.nn.Linear)
    assert torch.equal(forward(target.model, new_cache(target.model), [1, 2, 3]), before)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantized_copy(target.model, 3)


def test_fused_int4_products_are_the_parts_products():
    """An int4 copy runs q, k, v (and gate, up) as one product for a few rows: exactly the parts' outputs; prompts
    run through the parts."""
    for arch in ("llama", "qwen3"):
        copy4 = quantized_copy(tiny_model(arch, seed=4).model, 4)
        for layer in copy4.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for fused, parts in ((attn.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (mlp.gate_up,
                                                                                        (mlp.gate_proj, mlp.up_proj))):
                for rows in (1, 3, PREFILL_ROWS):
                    x = torch.randn(1, rows, parts[0].in_features, dtype=parts[0].float_weight.dtype)
                    got = fused(x)
                    assert len(got) == len(parts)
                    for y, part in zip(got, parts):
                        assert torch.equal(y, part(x))
    assert not hasattr(quantized_copy(tiny_model("llama").model, 8).model.layers[0].self_attn, "qkv")  # int4 only


def test_shapes_the_kernels_do_not_take_stay_float():
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 24), torch.nn.Linear(64, 32))
    model.get_output_embeddings = lambda: None
    copied = quantized_copy(model, 4)
    assert isinstance(copied[0], torch.nn.Linear)  # in_features 40: not a multiple of 32
    assert isinstance(copied[1], torch.nn.Linear)  # out_features 24: not a multiple of 16 (int4)
    assert isinstance(copied[2], Int4Linear)
    assert isinstance(quantized_copy(model, 8)[1], Int8Linear)  # int8 takes any number of rows


def test_the_drafter_starts_from_the_targets_prompt_cache():
    target = tiny_model("qwen3", seed=4)
    prompt = list(range(5, 5 + PREFILL_ROWS + 6))
    drafter = drafter_from_spec("int4", target)
    own = new_cache(drafter.model)
    forward(drafter.model, own, prompt[:-1])
    base = generate(target, prompt, max_new_tokens=12).tokens
    out = generate(target, prompt, drafter, k=3, max_new_tokens=12)
    assert out.tokens == base
    # after the run the drafter's cache still begins with the prompt's entries: the target's, equal to its own
    for mine, theirs in zip(drafter.cache.layers, own.layers):
        assert torch.equal(mine.keys[..., : len(prompt) - 1, :], theirs.keys)


@pytest.mark.slow
def test_int4_copy_of_the_embedded_model_is_close_and_exact_where_it_decodes(embedded):
    """The embedded GGUF's decoder layers are Q4_1: the int4 copy holds their exact grid, so only bfloat16
    activations and the int8 LM head separate it from the target (measured: 96.7% greedy agreement)."""
    ids = encode_prompt(embedded, "Explain how a refrigerator works, step by step.")
    base = generate(embedded, ids, max_new_tokens=48).tokens
    drafter = drafter_from_spec("int4", embedded)
    seq = ids + base
    with torch.inference_mode():
        p = forward(embedded.model, new_cache(embedded.model), seq)[len(ids) - 1 : -1]
        q = torch.stack([forward(drafter.model, c, [t])[0] for c in [new_cache(drafter.model)] for t in seq])
    q = q[len(ids) - 1 : -1]
    assert (p.argmax(-1) == q.argmax(-1)).float().mean() > 0.9
    out = generate(embedded, ids, drafter, k=6, max_new_tokens=48)
    assert out.tokens == base
    assert sum(out.accepted) / sum(out.drafted) > 0.6  # measured 74% of chains of 6 (ngram:3: about 15%)


def test_teacher_forced_scores_are_the_drafting_ones():
    """specert eval scores a drafter teacher-forced: a quantized copy must be scored on its integer kernels, as it
    drafts, not on the float weights it runs prompts on (which would make it the target itself)."""
    target = tiny_model("llama", seed=5)
    seq = list(range(3, 3 + PREFILL_ROWS + 24))
    prompt = PREFILL_ROWS + 2
    drafter = drafter_from_spec("int4", target)
    scored = drafter.score(seq, prompt)
    exact = forward(target.model, new_cache(target.model), seq)
    assert torch.allclose(scored[:prompt], exact[:prompt], atol=1e-9)  # the prompt: float weights, the target's
    cache = new_cache(drafter.model)
    forward(drafter.model, cache, seq[:prompt])
    stepwise = torch.cat([forward(drafter.model, cache, [t]) for t in seq[prompt:]])  # one token per step
    assert torch.allclose(scored[prompt:], stepwise, atol=1e-2 * float(stepwise.abs().max()))
    assert (scored[prompt:] - exact[prompt:]).abs().max() > 1e-3 * float(exact.abs().max())
