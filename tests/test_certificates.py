"""Certificates against brute force, soundness, tightness, universal bounds and edge cases (THEORY.md 2-4, 7)."""

import math
import zlib

import numpy as np
import pytest
import torch

import reference
import specert
from reference import random_logits
from specert.theory import stats, tensors
from specert.theory.rules import Tree, rule
from specert.theory.stats import masked_max
from specert.theory.tensors import COMPILE_MIN_ELEMENTS, chunk_extremes, top_k

CASES = 300  # random distributions per brute-force check
BRUTE_RULES = [
    "greedy",
    "additive:0.1",
    "additive:0.3",
    "multiplicative:0.5",
    "multiplicative:0.1",
    "topm:2",
    "typical:0.09,0.3",
    "typical:0.2,0.5,1e-05",
    "topm:2&additive:0.3",
    "greedy|multiplicative:0.5",
    "tree:1",
    "tree:2",
    "tree:3",
]


@pytest.mark.parametrize("cases", [30, pytest.param(300, marks=pytest.mark.slow)])
@pytest.mark.parametrize("spec", BRUTE_RULES)
def test_certificate_equals_brute_force(spec, cases):
    r = rule(spec)
    rng = np.random.default_rng([zlib.crc32(spec.encode()), cases])
    checked = 0
    while checked < cases:
        vocab = int(rng.integers(max(2, getattr(r, "m", 1) + 1, 3 if "topm:2" in spec else 2), 6))
        x = random_logits(rng, vocab)
        if isinstance(r, Tree) and r.m >= vocab:
            continue
        p = reference.softmax(x)
        exact = float(specert.certificate(x, r))
        brute = reference.brute_certificate(p, r)
        if math.isinf(brute):
            assert math.isinf(exact), (spec, x)
        else:
            assert exact == pytest.approx(brute, abs=1e-6), (spec, x)
        checked += 1


def test_drafter_certificate_equals_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(CASES):
        vocab = int(rng.integers(3, 6))
        m = int(rng.integers(1, vocab))
        x = random_logits(rng, vocab)
        x[np.isneginf(x)] = -30.0  # the brute force needs q > 0 (KL(p || q) is +inf where q = 0)
        q = reference.softmax(x)
        exact = float(specert.drafter_certificate(x, m))
        assert exact == pytest.approx(reference.brute_drafter_certificate(q, m), abs=1e-6), (x, m)


def test_drafter_certificate_closed_form_for_one_candidate_matches_the_group_construction(monkeypatch):
    """D_q(1)'s closed form (two top logits, one pass) against the general group construction at m = 1: small and
    full-size vocabularies, float32 and float64, ties at the top and at the second place, a concentrated drafter
    (the far branch), masked tokens, and one token of non-zero mass; eager (numpy) and as a compiled graph computes
    it (torch ops)."""
    from specert.theory.certificates import _drafter_certificate_group, top1_certificates

    def in_a_graph(logits):
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            return float(top1_certificates(logits)[0])

    rng = np.random.default_rng(3)
    rows = [random_logits(rng, int(rng.integers(2, 9))) for _ in range(CASES)]
    big = [rng.normal(size=49152) * s for s in (0.5, 2.0, 6.0)]
    for x in big[:2]:
        peaked = x.copy()
        peaked[17] = x.max() + 30  # q_1 ~ 1: the far branch
        sure = x.copy()
        sure[23] = x.max() + 90  # 1 - q_1 below float64's resolution next to 1: only the far branch is finite
        tied = x.copy()
        tied[5] = tied[9] = x.max() + 2  # a tie at the top: D = 0
        second = x.copy()
        second[3], second[4], second[8] = x.max() + 3, x.max() + 1, x.max() + 1  # a tie at the second place
        rows += [peaked, sure, tied, second]
    rows += big + [np.array([0.0, -np.inf, -np.inf]), np.array([1.0, 1.0 - 1e-6, -3.0])]
    for x in rows:
        for dtype in (torch.float32, torch.float64):
            logits = torch.tensor(x, dtype=dtype)[None]
            closed = float(top1_certificates(logits)[0])
            group = float(_drafter_certificate_group(logits, 1)[0])
            graph = in_a_graph(logits)
            if math.isinf(group):
                assert math.isinf(closed) and math.isinf(graph), x
            else:
                assert closed == pytest.approx(group, rel=2e-5, abs=1e-12), (x, dtype)
                assert graph == pytest.approx(group, rel=2e-5, abs=1e-12), (x, dtype)
            assert closed == float(specert.drafter_certificate(logits[0], 1))  # the public path is the closed form


def _drafters(rng, x, n):
    """n drafter logits [n, V]: perturbations of the target at many scales, and unrelated ones."""
    v = len(x)
    base = np.where(np.isneginf(x), -50.0, x)
    scales = 10 ** rng.uniform(-4, 1.5, size=(n, 1))
    near = base + scales * rng.normal(size=(n, v))
    far = rng.normal(size=(n // 4, v)) * rng.choice([0.5, 3, 10], size=(n // 4, 1))
    return np.concatenate([near, far])


@pytest.mark.parametrize("spec", ["greedy", "additive:0.3", "multiplicative:0.1", "topm:2", "typical:0.09,0.3",
                                  "topm:3&additive:0.6", "greedy|additive:0.1", "tree:2", "tree:3"])
def test_soundness_no_drafter_below_the_certificate_is_rejected(spec):
    rng = np.random.default_rng(11)
    total, below = 0, 0
    while total < 100_000:
        vocab = int(rng.integers(4, 9))
        x = random_logits(rng, vocab)
        c = float(specert.certificate(x, spec))
        q = _drafters(rng, x, 2000)
        # and drafters on the segment from the extremal drafter towards p: just inside the certificate
        if math.isfinite(c):
            star = specert.extremal_drafter(x, spec)
            p_log = np.log(reference.softmax(x))
            t = rng.uniform(0, 1, size=(200, 1))
            q = np.concatenate([q, np.log((1 - t) * np.exp(star) + t * np.exp(p_log))])
        d = specert.kl(np.broadcast_to(x, q.shape), q)
        ok = specert.accepts(np.broadcast_to(x, q.shape), q, spec)
        ref_ok = reference.accepts(reference.softmax(x), reference.softmax(q), rule(spec))
        certified = d < c
        assert ok[certified].all(), (spec, x)
        assert ref_ok[certified].all(), (spec, x)
        total += len(q)
        below += int(certified.sum())
    assert below > 1000  # the test exercised the certified region


@pytest.mark.parametrize("spec", BRUTE_RULES + ["topm:10&additive:0.6", "tree:8", "multiplicative:1.0"])
def test_tightness_extremal_drafter(spec, rng):
    for _ in range(50):
        x = random_logits(rng, 12)
        c = float(specert.certificate(x, spec))
        star = specert.extremal_drafter(x, spec)
        if math.isinf(c):
            assert np.isnan(star).all()
            continue
        assert float(specert.kl(x, star)) == pytest.approx(c, rel=1e-9, abs=1e-15)
        assert not specert.accepts(x, star, spec)
        assert not reference.accepts(reference.softmax(x), np.exp(star)[None], rule(spec))[0]


@pytest.mark.parametrize("spec", ["greedy", "additive:0.3", "multiplicative:0.1", "topm:4", "typical:0.09,0.3",
                                  "topm:10&additive:0.6"])
def test_universal_bound_log2_single_candidate(spec, rng):
    x = torch.tensor(np.stack([random_logits(rng, 50) for _ in range(2000)]))
    c = specert.certificate(x, spec)
    assert (c[torch.isfinite(c)] <= math.log(2)).all()
    point = torch.full((50,), -1e4, dtype=torch.float64)
    point[3] = 0.0
    assert float(specert.certificate(point, spec)) == pytest.approx(math.log(2), rel=1e-9)


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_universal_bound_tree(m, rng):
    x = torch.tensor(np.stack([random_logits(rng, 40) for _ in range(2000)]))
    assert (specert.certificate(x, f"tree:{m}") <= math.log(m + 1)).all()
    near_point = torch.full((40,), -40.0, dtype=torch.float64)
    near_point[0] = 0.0
    assert float(specert.certificate(near_point, f"tree:{m}")) == pytest.approx(math.log(m + 1), rel=1e-9)


def test_greedy_closed_form(rng):
    for _ in range(200):
        x = random_logits(rng, 30)
        p = np.sort(reference.softmax(x))[::-1]
        p1, p2 = p[0], p[1]
        expected = p1 * math.log(2 * p1 / (p1 + p2)) + (p2 * math.log(2 * p2 / (p1 + p2)) if p2 > 0 else 0)
        assert float(specert.certificate(x, "greedy")) == pytest.approx(expected, rel=1e-10, abs=1e-15)


def test_greedy_and_tree_1_agree(rng):
    x = torch.tensor(np.stack([random_logits(rng, 20) for _ in range(500)]))
    assert torch.allclose(specert.certificate(x, "greedy"), specert.certificate(x, "tree:1"), rtol=1e-12, atol=0)


class TestEdgeCases:
    def test_exact_tie_gives_zero_greedy_certificate(self):
        assert float(specert.certificate(torch.tensor([2.0, 2.0, 0.0]), "greedy")) == 0.0
        assert float(specert.certificate(np.array([1.0, 3.0, 3.0, -1.0]), "tree:1")) == 0.0

    def test_two_tokens(self):
        x = torch.tensor([0.8, 0.2]).log()
        p1, p2 = 0.8, 0.2
        expected = p1 * math.log(2 * p1) + p2 * math.log(2 * p2)
        assert float(specert.certificate(x, "greedy")) == pytest.approx(expected, rel=1e-5)
        assert math.isinf(float(specert.certificate(x, "additive:0.7")))

    def test_point_mass_and_masked_tokens(self):
        x = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
        assert float(specert.certificate(x, "greedy")) == pytest.approx(math.log(2), rel=1e-5)
        # additive with t near 1 accepts every token of non-zero probability here; masked tokens stay rejected
        assert float(specert.certificate(x, "additive:0.99")) == pytest.approx(math.log(2), rel=1e-5)
        y = torch.tensor([0.0, 0.1, -math.inf])
        assert math.isfinite(float(specert.certificate(y, "additive:0.99")))
        assert math.isinf(float(specert.certificate(torch.tensor([0.0, 0.1]), "additive:0.99")))

    def test_masked_drafter_token_is_rejected(self):
        target = torch.tensor([1.0, 0.0, -math.inf])
        draft = torch.tensor([0.0, 0.0, 5.0])
        assert not bool(specert.accepts(target, draft, "additive:0.99"))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    def test_low_precision_inputs(self, dtype, rng):
        x64 = torch.tensor(np.stack([random_logits(rng, 64) for _ in range(64)]))
        x = x64.to(dtype)
        exact = specert.certificate(x.double(), "greedy")
        low = specert.certificate(x, "greedy")
        assert low.dtype == torch.float64
        finite = torch.isfinite(exact)
        assert (low[finite] <= exact[finite]).all()  # rounded down: never above the exact value
        assert torch.allclose(low[finite], exact[finite], rtol=1e-4, atol=1e-7)
        for spec in ["tree:4", "typical:0.09,0.3", "additive:0.3"]:
            assert specert.certificate(x, spec).dtype == torch.float64
        assert specert.drafter_certificate(x).dtype == torch.float64

    def test_shapes(self, rng):
        x = torch.tensor(np.stack([random_logits(rng, 10) for _ in range(24)])).reshape(2, 3, 4, 10)
        c = specert.certificate(x, "tree:2")
        assert c.shape == (2, 3, 4)
        assert torch.equal(c[1, 2], specert.certificate(x[1, 2], "tree:2"))
        assert specert.certificate(x[0, 0, 0], "greedy").shape == ()
        assert specert.drafter_certificate(x, 2).shape == (2, 3, 4)
        assert specert.accepts(x, x, "greedy").shape == (2, 3, 4)
        assert specert.kl(x, x[0]).shape == (2, 3, 4)  # broadcast drafter
        many = specert.certificates(x, ["greedy", "tree:2"])
        assert torch.equal(many["tree:2"], c)

    def test_numpy_in_numpy_out(self, rng):
        x = random_logits(rng, 8).astype(np.float32)
        assert isinstance(specert.certificate(x, "greedy"), np.ndarray)
        lo, hi = specert.margin_bounds(x, "greedy")
        assert isinstance(lo, np.ndarray) and lo.dtype == np.float64

    def test_large_vocabulary_matches_float64(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(6, 151936, generator=g) * 3
        x[0, 7] = 30.0  # a peaked row
        for spec in ["greedy", "multiplicative:0.1", "typical:0.09,0.3", "tree:8", "topm:10&additive:0.6"]:
            c32 = specert.certificate(x, spec)
            c64 = specert.certificate(x.double(), spec)
            finite = torch.isfinite(c64)
            assert torch.equal(finite, torch.isfinite(c32)), spec
            assert torch.allclose(c32[finite], c64[finite], rtol=2e-5), spec


class TestOnePass:
    """The pass over the vocabulary (specert.theory.stats.gather): its top-k through chunk maxima and its search for
    rejected tokens, compiled for large blocks, give what plain torch gives."""

    @pytest.mark.parametrize("vocab", [5, 300, 4099, 70000])
    def test_top_k_matches_torch_topk(self, vocab):
        g = torch.Generator().manual_seed(vocab)
        for k in (1, 3, 16, 40):
            k = min(k, vocab)
            x = torch.randn(5, vocab, generator=g)
            x[1] = x[1].round()  # many ties
            x[2, torch.rand(vocab, generator=g) < 0.9] = -math.inf  # mostly masked
            x[3] = -5.0  # one value everywhere
            values, index = top_k(x, k)
            assert torch.equal(values, torch.topk(x, k, -1).values)
            assert torch.equal(x.gather(-1, index), values)
            assert all(len(set(row.tolist())) == k for row in index)

    @staticmethod
    def _flat_peaked_masked(vocab, seed=11):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, vocab, generator=g)  # flat rows: deep searches
        x[1] *= 3
        x[2, :100] += 12.0  # a peaked row
        x[3, torch.rand(vocab, generator=g) < 0.5] = -math.inf  # masked tokens
        x[4, 1:] = -math.inf  # a point mass
        return x

    def test_the_compiled_kernels_give_the_certificates_of_plain_torch(self, monkeypatch):
        x = self._flat_peaked_masked(32773)
        rules = [*specert.STANDARD_RULES, "typical:0.2,0.5,1e-05", "threshold:0.02"]
        single = [rule(r) for r in rules if not isinstance(rule(r), Tree)]
        assert x.numel() >= COMPILE_MIN_ELEMENTS
        compiled = specert.certificates(x, rules)
        found = stats.gather(x, 16, [0.0], [r.reject_bound for r in single]).rejected
        monkeypatch.setattr(tensors, "COMPILE_MIN_ELEMENTS", x.numel() + 1)  # every block by plain torch
        plain = specert.certificates(x, rules)
        for a, b in zip(found, stats.gather(x, 16, [0.0], [r.reject_bound for r in single]).rejected):
            assert torch.equal(a.logit, b.logit) and torch.equal(a.found, b.found)  # the same rejected tokens
        for spec in rules:
            # the normalisers differ only in the order of their sums (relative 1e-7), far below the rounding
            assert torch.equal(torch.isfinite(compiled[spec]), torch.isfinite(plain[spec])), spec
            finite = torch.isfinite(plain[spec])
            assert torch.allclose(compiled[spec][finite], plain[spec][finite], rtol=1e-6, atol=0), spec

    @pytest.mark.parametrize("compiled", [True, False])
    @pytest.mark.parametrize("vocab", [50, 32773])
    def test_exp_sums_within_their_error_bound(self, monkeypatch, compiled, vocab):
        x = self._flat_peaked_masked(vocab, seed=vocab)
        x[5] *= 30  # gaps down to about -300: terms that underflow float32
        if not compiled:
            monkeypatch.setattr(tensors, "COMPILE_MIN_ELEMENTS", x.numel() + 1)
        top = x.amax(-1)
        total, gaps = stats.exp_sums(x, top, with_gaps=True)
        a = x.double() - top.double()[:, None]  # exact: a float32 difference fits in float64
        e = torch.exp(a)
        exact_total, exact_gaps = e.sum(-1), torch.where(e > 0, e * a, 0.0).sum(-1)
        rtol = stats.normaliser_rtol(torch.float32, vocab)
        for s in (total, stats.exp_sums(x, top)[0]):
            assert torch.all((s - exact_total).abs() <= rtol * exact_total)
        # the bound the entropy's error relies on (stats.gather)
        gap_rtol = rtol + 107 * stats.unit_roundoff(torch.float32)
        assert torch.all((gaps - exact_gaps).abs() <= gap_rtol * exact_gaps.abs() + 1e-30 * vocab)

    @pytest.mark.parametrize("vocab", [50, 4099, 70000])
    def test_chunk_extremes(self, monkeypatch, vocab):
        x = self._flat_peaked_masked(vocab, seed=vocab)
        for compiled in (True, False):
            if not compiled:
                monkeypatch.setattr(tensors, "COMPILE_MIN_ELEMENTS", x.numel() + 1)
            assert compiled == (x.numel() >= tensors.COMPILE_MIN_ELEMENTS) or vocab == 50
            chunk_max, lowest = chunk_extremes(x)
            whole = vocab - vocab % tensors.TOPK_CHUNK
            assert torch.equal(chunk_max, x[:, :whole].reshape(len(x), -1, tensors.TOPK_CHUNK).amax(-1))
            assert torch.equal(lowest, x.amin(-1))
            assert torch.equal(top_k(x, 16, chunk_max)[0], torch.topk(x, 16, -1).values)

    def test_masked_max_compiled_equals_plain_torch(self):
        g = torch.Generator().manual_seed(5)
        block = torch.randn(20, COMPILE_MIN_ELEMENTS // 16, generator=g)
        assert block.numel() >= COMPILE_MIN_ELEMENTS
        block[3, ::7] = -math.inf
        top = block.amax(-1)
        level = torch.stack([top - 1.0, top + 1, torch.full((20,), -math.inf), torch.full((20,), -9.0)], -1)
        row = torch.tensor([0, 3, 3, 3, 3, 7, 19, 19])  # [P] pairs of a row and one of its levels
        col = torch.tensor([0, 0, 1, 2, 3, 1, 0, 3])
        best = masked_max(block, row, level[row, col])  # compiled
        assert torch.equal(best, stats._masked_max_by_blocks(block, row, level[row, col]))
        for p in range(len(row)):
            x = block[row[p]]
            assert best[p] == torch.where(x <= level[row[p], col[p]], x, -math.inf).amax(), p


class TestBadInput:
    @pytest.mark.parametrize(
        "x, message",
        [
            (torch.tensor([0.0, float("nan")]), "NaN"),
            (torch.tensor([0.0, float("inf")]), r"\+inf"),
            (torch.tensor([0.0]), "V >= 2"),
            (torch.tensor([-math.inf, -math.inf]), "every logit is -inf"),
            (torch.tensor([1, 2]), "floating-point"),
            ([0.0, 1.0], "torch tensor or a numpy array"),
        ],
    )
    def test_bad_logits(self, x, message):
        with pytest.raises(ValueError, match=message):
            specert.certificate(x, "greedy")

    def test_vocabulary_mismatch(self):
        with pytest.raises(ValueError, match="different vocabularies"):
            specert.kl(torch.zeros(5), torch.zeros(6))
        with pytest.raises(ValueError, match="different vocabularies"):
            specert.accepts(torch.zeros(5), torch.zeros(6), "greedy")

    def test_m_too_large(self):
        with pytest.raises(ValueError, match="smaller than the vocabulary size"):
            specert.certificate(torch.zeros(4), "tree:4")
        with pytest.raises(ValueError, match="smaller than the vocabulary size"):
            specert.certificate(torch.zeros(4), "topm:10&additive:0.6")
        with pytest.raises(ValueError, match="1 <= m < V"):
            specert.drafter_certificate(torch.zeros(4), 4)
