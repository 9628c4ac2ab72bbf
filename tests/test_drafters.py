"""The drafters (specert.drafters): prompt lookup copies a span, a model drafter keeps the accepted path of its tree,
and drafter specs, vocabularies and layer-skip depths are checked."""

import pytest
import torch

from specert.decoding.schedules import make_schedule
from specert.drafters.model import ModelDrafter, layer_skip_view, model_drafter
from specert.drafters.ngram import NGramDrafter
from specert.drafters.spec import check_drafter_spec, drafter_from_spec
from tiny import tiny_model

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42]


def test_ngram_chain_copies_a_span():
    """After the longest suffix match, a chain continues the occurrence it copied from (not a fresh vote per
    token), and a tree's further children are the other continuations."""
    context = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 7, 7, 1, 2, 3]
    drafter = NGramDrafter(2)
    # suffix (2, 3) was followed by 9 and by 4, once each: the most recent (4) first, then its span 5, 6, 7
    chain = drafter.propose(context, make_schedule(k=4))
    assert chain.tokens == [4, 5, 6, 7] and chain.parents == [-1, 0, 1, 2]
    assert drafter.continuations(torch.tensor(context)) == (2, [(4, 8), (9, 3)])
    tree = drafter.propose(context, make_schedule(tree="2,1"))
    assert tree.tokens == [4, 9, 5, 9] and tree.parents == [-1, -1, 0, 1]


def test_a_tree_drafters_next_proposal_keeps_the_accepted_path(monkeypatch):
    """A model drafter scores each tree node as its path run causally. After a tree, it keeps the entries of the
    accepted nodes it ran (the path's causal entries) and runs only the rest: its next proposal equals that of a
    drafter synced from scratch."""
    target = tiny_model("llama", seed=3)
    drafter, fresh = (ModelDrafter(layer_skip_view(target.model, 2), "layerskip:2") for _ in range(2))
    shape = dict(tree="2,2,1")
    tree = drafter.propose(list(PROMPT), make_schedule(**shape))
    for node in range(len(tree.tokens)):  # every node is scored as its path run causally (positions, mask)
        if tree.expanded[node + 1]:
            path, up = [], node
            while up >= 0:
                path, up = [tree.tokens[up]] + path, tree.parents[up]
            causal = fresh.propose(list(PROMPT) + path, make_schedule(k=1)).logits[0]
            assert torch.allclose(tree.logits[node + 1], causal, atol=1e-9), node
    first = 0
    second = next(i for i, p in enumerate(tree.parents) if p == first)
    deepest = next(i for i, p in enumerate(tree.parents) if p == second)  # a leaf: never run by the drafter
    ran, run = [], ModelDrafter._run
    monkeypatch.setattr(ModelDrafter, "_run", lambda self, tokens: ran.append(len(tokens)) or run(self, tokens))
    for accepted, runs in (([first, second], 1), ([first, second, deepest], 2), ([first], 1)):
        drafter.propose(list(PROMPT), make_schedule(**shape))
        context = list(PROMPT) + [tree.tokens[i] for i in accepted] + [7]  # + the bonus token
        ran.clear()
        got = drafter.propose(context, make_schedule(**shape))
        assert ran[0] == runs, accepted  # the catch-up: the bonus token (and a leaf, which was never run)
        want = fresh.propose(context, make_schedule(**shape))
        assert got.tokens == want.tokens and got.parents == want.parents
        assert torch.allclose(got.logits, want.logits, atol=1e-9, equal_nan=True)
    # a context that does not continue the tree keeps none of it
    drafter.propose(list(PROMPT), make_schedule(**shape))
    other = list(PROMPT[:-1]) + [3, 4]
    assert torch.allclose(drafter.propose(other, make_schedule(**shape)).logits,
                          fresh.propose(other, make_schedule(**shape)).logits, atol=1e-9, equal_nan=True)


def test_model_drafter_with_another_vocabulary_is_refused(tmp_path):
    target = tiny_model("llama", seed=1)
    tiny_model("llama", seed=2, vocab=300).model.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="must share the target's vocabulary"):
        drafter_from_spec(f"model:{tmp_path / 'other'}", target)


@pytest.mark.parametrize("spec", ["foo:1", "layerskip:x", "layerskip", "model:"])
def test_bad_drafter_specs(spec):
    with pytest.raises(ValueError, match="drafter spec"):
        drafter_from_spec(spec, tiny_model("llama", seed=1))


@pytest.mark.parametrize("spec", ["compiled:ngram:3", "compiled:head", "compiled:", "compiled:layerskip:x"])
def test_compiled_takes_model_drafters_only(spec):
    with pytest.raises(ValueError, match="drafter spec"):
        check_drafter_spec(spec)


class TestBadInput:
    def test_vocabulary_mismatch(self, target):
        other = tiny_model("llama", seed=3, vocab=300)
        with pytest.raises(ValueError, match="must share the target's vocabulary"):
            model_drafter(other, target)

    def test_layerskip_depth(self, target):
        with pytest.raises(ValueError, match="1 <= L < 4"):
            layer_skip_view(target.model, 4)
