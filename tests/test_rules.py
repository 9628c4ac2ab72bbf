"""Rule specs: parsing, printing back, validation; TensorRT-LLM's relaxed acceptance as a combination."""

import math

import numpy as np
import pytest
import torch

import specert
from specert.theory.rules import STANDARD_RULES, Additive, AllOf, AnyOf, Multiplicative, TopM, Tree, Typical, rule


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
        ("additive:1", "t must be < 1, got 1.0: with t >= 1, p"),  # accepts every draft: refused
        ("additive:2", "would accept every draft"),
        ("greedy|additive:1.5", "would accept every draft"),
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
    from specert.theory.acceptance import tokens_accepted

    vocab = 12
    for spec in [s for s in STANDARD_RULES if not s.startswith("tree")] + ["topm:3"]:
        r = rule(spec)
        for _ in range(150):
            logits = random_logits(rng, vocab)
            got = tokens_accepted(torch.tensor(logits).expand(vocab, vocab), torch.arange(vocab), r)
            assert got.tolist() == accepted_tokens(softmax(logits), r).tolist(), (spec, logits)


# --------------------------------------------------------------------------------------------------------------------
# threshold:TAU and the engines' presets


def test_threshold_rule():
    from specert.theory.rules import Threshold

    assert rule("threshold:0.2") == Threshold(0.2)
    assert str(rule("threshold:0.2")) == "threshold:0.2"
    # non-strict, as SGLang compares: a token at exactly tau is accepted, one below rejected
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    drafts = torch.eye(4, dtype=torch.float64) * 10
    assert specert.accepts(p.log().expand(4, -1), drafts, "threshold:0.25").tolist() == [True, True, False, False]
    # its certificate: W(p, j*) with j* the most probable token below tau (reference: brute-force minimisation)
    from reference import _min_kl_over_q

    # (tau off the tie: a token within rounding of tau counts as rejected, so that a certificate never overstates)
    expected = _min_kl_over_q(p.numpy(), [(2, i) for i in range(4) if i != 2])
    assert float(specert.certificate(p.log(), "threshold:0.2")) == pytest.approx(expected, abs=1e-6)
    assert math.isinf(float(specert.certificate(p.log(), "threshold:0.1")))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("trtllm-relaxed", AllOf((TopM(10), Additive(0.6)))),
        ("trtllm-relaxed:4,0.25", AllOf((TopM(4), Additive(0.25)))),
        ("vllm-relaxed", AllOf((TopM(3), Multiplicative(0.5)))),
        ("vllm-relaxed:10,0.7", AllOf((TopM(10), Multiplicative(0.7)))),
        ("sglang-threshold:0.3", "threshold:0.3"),
        ("medusa", Typical(0.09, 0.3, 1e-5)),
        ("medusa:0.1,0.2", Typical(0.1, 0.2, 1e-5)),
        ("greedy|trtllm-relaxed", AnyOf((TopM(1), AllOf((TopM(10), Additive(0.6)))))),
        ("trtllm-relaxed&threshold:0.1", "topm:10&additive:0.6&threshold:0.1"),
    ],
)
def test_presets_parse_to_their_rules(spec, expected):
    expected = rule(expected) if isinstance(expected, str) else expected
    assert rule(spec) == expected
    assert rule(str(rule(spec))) == rule(spec)  # the preset is an alias: it prints back as the canonical spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("trtllm-relaxed:10", r"takes 2 number\(s\) or none \(trtllm-relaxed\[:K,DELTA\]\), got 1"),
        ("trtllm-relaxed:2.5,0.6", "first argument must be a whole number, got 2.5"),
        ("trtllm-relaxed:0,0.6", "m must be a whole number >= 1"),
        ("trtllm-relaxed:10,-1", "t must be >= 0"),
        ("trtllm-relaxed:10,1", "DELTA must be < 1, got 1.0: .* write topm:10 for that"),
        ("vllm-relaxed:3,1.5", r"alpha must be in \(0, 1\]"),
        ("vllm-relaxed:a,b", "must be numbers"),
        ("sglang-threshold", r"takes 1 number\(s\) \(sglang-threshold:TAU\), got 0"),
        ("sglang-threshold:0", r"tau must be in \(0, 1\]"),
        ("threshold:1.5", r"tau must be in \(0, 1\]"),
        ("threshold", "takes 1 number"),
        ("medusa:0.09", r"takes 2 number\(s\) or none"),
        ("medusa:0,0.3", "eps"),
    ],
)
def test_bad_presets(spec, message):
    with pytest.raises(ValueError, match=message):
        rule(spec)


def _engine_accepts(name, logits, args):
    """The engines' own comparisons, re-implemented from their sources (float64), for every token as the draft.

    Returns bool [V] per draft token under the engine's tie-breaking (torch.topk's order)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    p = torch.softmax(z, -1)
    vocab = len(p)
    ok = torch.zeros(vocab, dtype=torch.bool)
    if name == "trtllm":  # mtpRelaxedAcceptanceKernel: scan ranks, stop once p_(1) - delta > p_(r) for r > 0
        k, delta = args
        values, order = torch.topk(p, k)
        threshold = values[0] - delta
        for r in range(k):
            if r > 0 and threshold > values[r]:
                break
            ok[order[r]] = True
    elif name == "vllm":  # PR #45229: draft in top-k and z_d >= z_(1) + log r
        k, ratio = args
        _, order = torch.topk(z, k)
        ok[order] = z[order] >= z.max() + math.log(ratio)
    elif name == "sglang":  # deterministic clause: p(d) >= threshold_single (and p > 0)
        ok = (p >= args[0]) & (p > 0)
    elif name == "medusa":  # evaluate_posterior, fast typical: p(d) > min(eps, delta exp(-H_{1e-5}))
        eps, delta = args
        h = -(p * torch.log(p + 1e-5)).sum()
        ok = p > min(eps, delta * math.exp(-float(h)))
    return ok


ENGINES = [
    ("trtllm", (10, 0.6), "trtllm-relaxed"),
    ("trtllm", (3, 0.2), "trtllm-relaxed:3,0.2"),
    ("vllm", (3, 0.5), "vllm-relaxed"),
    ("vllm", (10, 0.7), "vllm-relaxed:10,0.7"),
    ("sglang", (0.1,), "sglang-threshold:0.1"),
    ("medusa", (0.09, 0.3), "medusa"),
]


@pytest.mark.parametrize("engine, args, spec", ENGINES)
def test_presets_decide_as_the_engines(engine, args, spec, rng):
    """On random distributions (flat to peaked, with ties), each preset accepts exactly the tokens the engine's
    comparison accepts, except at a top-k tie at the K-th rank, where specert rejects what the engine may keep."""
    from specert.theory.acceptance import tokens_accepted

    vocab = 24
    for _ in range(300):
        z = rng.normal(size=vocab) * rng.choice([0.3, 1.0, 3.0])
        if rng.random() < 0.3:  # ties, at and around the top-k boundary
            z[rng.integers(vocab, size=3)] = z[rng.integers(vocab)]
        if rng.random() < 0.2:
            z = np.round(z)  # many ties
        ours = tokens_accepted(torch.tensor(z).expand(vocab, -1), torch.arange(vocab), spec)
        theirs = _engine_accepts(engine, z, args)
        assert not (ours & ~theirs).any(), (spec, z)  # never accept what the engine rejects
        if engine in ("trtllm", "vllm"):
            k = args[0]
            kth = np.sort(z)[::-1][k - 1]
            ambiguous = torch.tensor((z == kth) & (np.sort(z)[::-1][k] == kth))  # a tie across the K-th rank
            assert ((ours == theirs) | ambiguous).all(), (spec, z)
        else:
            assert (ours == theirs).all(), (spec, z)


def test_presets_at_exact_ties():
    """Where the comparison's strictness decides: p(d) equal to the engine's threshold."""
    from specert.theory.acceptance import tokens_accepted

    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=torch.float64)
    z = p.log()

    def accepted(spec):
        return tokens_accepted(z.expand(5, -1), torch.arange(5), spec).tolist()

    # SGLang p(d) >= 0.25: accepted at equality
    two, one = [True, True, False, False, False], [True, False, False, False, False]
    assert accepted("sglang-threshold:0.25") == two == _engine_accepts("sglang", z, (0.25,)).tolist()
    # TensorRT-LLM p(d) >= p_(1) - delta: accepted at equality (0.25 = 0.5 - 0.25)
    assert accepted("trtllm-relaxed:3,0.25") == two == _engine_accepts("trtllm", z, (3, 0.25)).tolist()
    # vLLM's proposal, z_d >= z_(1) + log r: accepted at equality (0.25 = 0.5 * 0.5)
    assert accepted("vllm-relaxed:3,0.5") == two == _engine_accepts("vllm", z, (3, 0.5)).tolist()
    # Medusa p(d) > min(eps, ...): rejected at equality (eps = 0.25 binds: delta exp(-H) > 0.25)
    assert accepted("medusa:0.25,1.0") == one == _engine_accepts("medusa", z, (0.25, 1.0)).tolist()
    # top-k tie at the K-th rank: the engine keeps one of the two tokens at 0.0625, specert rejects both
    theirs = _engine_accepts("trtllm", z, (4, 0.5))
    assert theirs[:3].all() and int(theirs[3:].sum()) == 1
    assert accepted("trtllm-relaxed:4,0.5") == [True, True, True, False, False]


def test_degenerate_rules_are_refused_by_the_constructors_too():
    """A rule that accepts every draft by construction is refused by the API as by the parser; t just below 1 is a
    rule still (it rejects the tokens of p below p(x0) - t > 0)."""
    from specert.theory.rules import trtllm_relaxed

    with pytest.raises(ValueError, match="would accept every draft"):
        Additive(1.0)
    with pytest.raises(ValueError, match="DELTA must be < 1"):
        trtllm_relaxed(10, 1.0)
    p = torch.tensor([0.995, 0.004, 0.001], dtype=torch.float64)
    drafts = torch.eye(3, dtype=torch.float64) * 10
    assert specert.accepts(p.log().expand(3, -1), drafts, Additive(0.99)).tolist() == [True, False, False]
    for width in ("topm:4", "tree:4"):  # m >= V: every token is in the top m
        with pytest.raises(ValueError, match="smaller than the vocabulary size V = 4"):
            rule(width).validate(4)
