"""Loading models from local directories and GGUF files, and their errors."""

import pytest
import torch

from specert.decoding.loop import generate
from specert.decoding.models import encode_prompt, load_model
from specert.drafters.spec import drafter_from_spec
from tiny import tiny_model


def test_local_directory_and_model_drafter(tmp_path):
    target = tiny_model("llama", seed=1)
    draft = tiny_model("qwen3", seed=5, layers=2)
    draft.model.save_pretrained(tmp_path / "draft")
    loaded = load_model(str(tmp_path / "draft"))
    assert loaded.vocab_size == draft.vocab_size
    assert loaded.model.dtype == torch.float32
    drafter = drafter_from_spec(f"model:{tmp_path / 'draft'}", target)
    base = generate(target, [1, 2, 3], max_new_tokens=12).tokens
    assert generate(target, [1, 2, 3], drafter, k=3, max_new_tokens=12).tokens == base


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/model.gguf", "no such GGUF file"),
    ("./no/such/dir", "no such directory"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_text_prompt_needs_a_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer"):
        encode_prompt(tiny_model("llama"), "hello")


def test_batched_greedy_equals_one_prompt_at_a_time():
    """Left padding and prompts leaving the batch at their EOS change nothing: each row is that prompt's greedy."""
    from specert.decoding.forward import batched_greedy

    probe = tiny_model()
    prompts = [[5, 17, 30], [9, 2, 44, 81, 120, 7], [200], [33, 34, 35, 36]]
    first = generate(probe, prompts[1], None, max_new_tokens=4).tokens
    target = tiny_model(eos=first[2])  # prompt 1 ends at its third token, the others whenever they meet it
    rows: list[list[int]] = [[] for _ in prompts]
    for _, logits, tokens, alive in batched_greedy(target.model, prompts, 12, {first[2]}):
        for r in alive.nonzero()[:, 0].tolist():
            rows[r].append(int(tokens[r]))
            assert int(logits[r].argmax()) == int(tokens[r])
    for prompt, row in zip(prompts, rows):
        assert row == generate(target, prompt, None, max_new_tokens=12).tokens
    assert len(rows[1]) == 3


def test_linear_is_the_modules_product_in_either_layout():
    """:func:`specert.decoding.forward.linear` computes ``x W^T + b`` as ``(W x^T)^T + b`` for float32 Linear
    layers (one row doubled) when told to, for any leading shape, and as the module does otherwise; other modules
    and dtypes run
    through their own forward."""
    from specert.decoding.forward import linear
    from specert.decoding.quantized import quantized_copy

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    for columns in (True, False):
        for shape in ((64,), (1, 1, 64), (1, 2, 64), (1, 5, 64), (3, 4, 64)):
            x = torch.randn(shape)
            got = linear(layer, x, columns)
            assert got.shape == (*shape[:-1], 48) and got.is_contiguous()
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
            if not columns:
                assert torch.equal(got, layer(x))
    half = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    assert torch.equal(linear(half, x, True), half(x))
    model = quantized_copy(tiny_model("llama", seed=1).model, 4)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is not torch.nn.Linear  # an int4 layer: its own kernel
    x = torch.randn(1, 2, q.in_features)
    assert torch.equal(linear(q, x, True), q(x))


def test_choose_layout_takes_the_faster_layout(monkeypatch):
    """:func:`specert.decoding.forward.choose_layout` records on the model whichever layout of
    :func:`~specert.decoding.forward.linear` its clock timed faster (a fake clock here: each product advances it by
    what its layout is made to cost)."""
    import specert.decoding.forward as models

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32))
    now, cost = [0.0], {}
    product = models._product

    def timed(weight, rows, columns):
        now[0] += cost[columns]
        return product(weight, rows, columns)

    monkeypatch.setattr(models, "_product", timed)
    for costs, want in (({False: 2.0, True: 1.0}, True), ({False: 1.0, True: 2.0}, False)):
        cost.update(costs)
        assert models.choose_layout(model, clock=lambda: now[0]) is want
        assert models.layout(model) is want
