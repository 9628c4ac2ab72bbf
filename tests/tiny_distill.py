"""Tiny distillation runs for the tests of the trained drafters: the chats they train on, a small config, and the
check that a trained drafter decodes losslessly."""

from specert.decoding.loop import generate
from specert.train.config import DistillConfig

CHATS = [
    [{"role": "user", "content": f"Count from {i} to {i + 9} and say why numbers matter."},
     {"role": "assistant", "content": " ".join(str(j) for j in range(i, i + 10)) + ". Numbers let us measure."}]
    for i in range(40)
]


def small_config(tiny_chat_dir, chats, **kw):
    base = dict(target=str(tiny_chat_dir), data=str(chats), answers="data", texts=30, held_out=6, max_tokens=64,
                draft_vocab=300, depths=2, steps=40, batch_size=4, lr=3e-3, save_every=10)
    return DistillConfig(**{**base, **kw})


def assert_decodes_losslessly(target, drafter, shape):
    """Strict greedy with ``drafter`` in ``shape`` gives the target's own greedy tokens; certified steps accepted."""
    for prompt in ([5, 17, 300, 2000, 17, 300], [7]):
        expected = generate(target, prompt, None, max_new_tokens=30, stop_at_eos=False).tokens
        got = generate(target, prompt, drafter, "greedy", max_new_tokens=30, stop_at_eos=False, trace=True, **shape)
        assert got.tokens == expected
        assert all(row.accepted for row in got.trace if row.kl < row.certificate)
