"""Rule specs: parsing, printing back, validation; TensorRT-LLM's relaxed acceptance as a combination."""

import math

import pytest
import torch

import specert
from specert.rules import STANDARD_RULES, Additive, AllOf, AnyOf, Multiplicative, TopM, Tree, Typical, rule


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("greedy", TopM(1)),
        ("topm:1", TopM(1)),
        ("additive:0.3", Additive(0.3)),
        ("multiplicative:0.1", Multiplicative(0.1)),
        ("topm:4", TopM(4)),
        ("typical", Typical(0.09, 0.3)),
        ("typical:0.09,0.3", Typical(0.09, 0.3)),
        ("typical:0.09,0.3,1e-5", Typical(0.09, 0.3, 1e-5)),
        ("tree:8", Tree(8)),
        ("topm:10&additive:0.6", AllOf((TopM(10), Additive(0.6)))),
        ("greedy|additive:0.1", AnyOf((TopM(1), Additive(0.1)))),
        (" TopM:10 & additive:0.6 | greedy ", AnyOf((AllOf((TopM(10), Additive(0.6))), TopM(1)))),
    ],
)
def test_parse(spec, expected):
    assert rule(spec) == expected


@pytest.mark.parametrize("spec", list(STANDARD_RULES) + ["typical:0.09,0.3,1e-05", "greedy|topm:10&additive:0.6"])
def test_round_trip(spec):
    assert str(rule(spec)) == spec
    assert rule(str(rule(spec))) == rule(spec)


def test_rule_objects_pass_through():
    r = Additive(0.3)
    assert rule(r) is r
    x = torch.randn(5, 20)
    assert torch.equal(specert.certificate(x, r), specert.certificate(x, "additive:0.3"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "non-empty"),
        ("greedyy", "unknown rule 'greedyy'"),
        ("additive", "takes 1 number"),
        ("additive:-0.1", "t must be >= 0"),
        ("additive:x", "must be numbers"),
        ("multiplicative:0", r"alpha must be in \(0, 1\]"),
        ("multiplicative:1.5", r"alpha must be in \(0, 1\]"),
        ("topm:0", "m must be a whole number >= 1"),
        ("topm:2.5", "one whole number"),
        ("tree:0", "m must be a whole number >= 1"),
        ("typical:0.1,0.2,0.3,0.4", "0 to 3 number"),
        ("typical:0,0.3", "eps"),
        ("tree:2&greedy", "cannot be combined"),
        ("greedy:1", "no argument"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        rule(spec)


def test_any_of_inside_all_of_is_refused():
    with pytest.raises(ValueError, match="any-of of all-ofs"):
        AllOf((AnyOf((TopM(1), Additive(0.1))), TopM(2)))


def test_trtllm_relaxed_acceptance():
    """TensorRT-LLM relaxed acceptance: the draft must be in the target's top-10 *and* within 0.6 of p(x0)."""
    r = rule("topm:10&additive:0.6")
    # p: one dominant token (0.9) and twenty tokens of 0.005: rank-2 is within top-10 and within 0.6? 0.9-0.005 > 0.6
    p = torch.tensor([0.9] + [0.005] * 20).log()
    drafts = torch.eye(21) * 10  # drafter greedy token = i
    ok = specert.accepts(p.expand(21, -1), drafts, r)
    assert ok.tolist() == [True] + [False] * 20
    # flatter p: p(x0) < 0.6, so additive:0.6 accepts everything and top-10 decides
    p2 = torch.linspace(1.0, 0.0, 21, dtype=torch.float64)  # distinct logits, p(x0) about 0.08
    ok2 = specert.accepts(p2.expand(21, -1), drafts, r)
    assert ok2.sum() == 10 and ok2[0]
    c = specert.certificate(p2, r)
    assert float(c) == pytest.approx(float(specert.certificate(p2, "topm:10")), rel=1e-12)
    assert math.isinf(float(specert.certificate(p2, "additive:0.6")))


def test_decoder_verifier_matches_literal_rules(rng):
    """`tokens_accepted` (the decoder's per-token verifier, with its top-m fast path) against THEORY.md read
    literally, every token of random small vocabularies (ties and masked tokens included)."""
    from reference import accepted_tokens, random_logits, softmax
    from specert.acceptance import tokens_accepted

    vocab = 12
    for spec in [s for s in STANDARD_RULES if not s.startswith("tree")] + ["topm:3"]:
        r = rule(spec)
        for _ in range(150):
            logits = random_logits(rng, vocab)
            got = tokens_accepted(torch.tensor(logits).expand(vocab, vocab), torch.arange(vocab), r)
            assert got.tolist() == accepted_tokens(softmax(logits), r).tolist(), (spec, logits)
