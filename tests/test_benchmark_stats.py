"""The per-category comparison of benchmarks/adaptive.py: paired t intervals and Holm's step-down procedure."""

import importlib.util
import math
from pathlib import Path

import numpy as np

from specert.decoding.trace import SpecDecodeMetrics

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptive.py"
spec = importlib.util.spec_from_file_location("adaptive", BENCHMARK)
adaptive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adaptive)


def runs(ratios, tokens=48):
    """(tokens, seconds) per prompt of a config whose tokens/s is ``ratios`` times a config taking 1 s."""
    return [(tokens, 1.0 / r) for r in ratios], [(tokens, 1.0)] * len(ratios)


def test_interval_is_the_geometric_mean_with_a_t_interval():
    ratios = [0.97, 0.99, 0.975, 0.98]
    mean, lo, hi = adaptive.interval(*runs(ratios))
    assert math.isclose(mean, float(np.exp(np.log(ratios).mean())))
    assert lo < mean < hi < 1.0
    assert adaptive.interval(*runs([1.1]))[1:] == (0.0, math.inf)  # one prompt: no interval


def test_holm_finds_a_slower_category_and_steps_down():
    slow = [0.97, 0.975, 0.98, 0.972, 0.978, 0.974]  # about 2.5% slower, little spread: p ~ 1e-6
    mild = [0.99, 0.985, 0.995, 0.988, 0.992, 0.986]  # about 1% slower
    noisy = [1.05, 0.92, 1.1, 0.95, 1.02, 0.97]
    pairs = {"slow": runs(slow), "mild": runs(mild), "noisy": runs(noisy), "one": runs([0.5])}
    assert adaptive.holm(pairs, "less") == ["slow", "mild"]  # one prompt: not tested
    assert adaptive.holm(pairs, "greater") == []
    # p-values just below 0.01 and 0.03 among two tests: Bonferroni (0.025 each) would take only the first, Holm
    # both. Three log ratios -d - s, -d, -d + s have t = -d sqrt(3) / s, so d = -t_2(p) s / sqrt(3) gives p-value p.
    spread = 0.02
    pairs = {}
    for name, p in (("a", 0.0099), ("b", 0.0299)):
        d = -adaptive.stats.t.ppf(p, 2) * spread / math.sqrt(3)
        pairs[name] = runs(np.exp([-d - spread, -d, -d + spread]))
    assert adaptive.holm(pairs, "less", alpha=0.05) == ["a", "b"]


def test_holm_on_configs_of_equal_speed_seldom_finds_any(rng):
    # 13 categories of 6 prompts, 3% noise per prompt, no true difference: one 90% interval or more lies below 1 in
    # about half the runs, Holm's procedure finds a category in about 5% of them
    found = raw = 0
    for _ in range(200):
        pairs = {c: runs(np.exp(rng.normal(0, 0.03, 6))) for c in range(13)}
        found += bool(adaptive.holm(pairs, "less"))
        raw += any(adaptive.interval(*pair)[2] < 1 for pair in pairs.values())
    assert found <= 20 and raw >= 70


def test_count_ratio_is_the_ratio_of_summed_counts_with_a_paired_interval(rng):
    def prompts(verifying_per_accepted, noise):
        out = []
        for accepted in rng.integers(5, 40, 30):
            drafts = int(accepted)  # one drafting step per accepted token: drafts and accepted alike
            verifying = int(round(accepted * verifying_per_accepted * np.exp(rng.normal(0, noise))))
            out.append(SpecDecodeMetrics(num_drafts=drafts, num_accepted_tokens=int(accepted),
                                         num_verifying_tokens=verifying, num_target_tokens=verifying + 3,
                                         num_generated_tokens=48, num_draft_tokens=verifying - drafts))
        return out

    fewer, base = prompts(2.0, 0.1), prompts(2.5, 0.1)
    r, lo, hi = adaptive.count_ratio(fewer, base, "verifying_tokens_per_accepted")
    summed = (sum(m.num_verifying_tokens for m in fewer) / sum(m.num_accepted_tokens for m in fewer)) / (
        sum(m.num_verifying_tokens for m in base) / sum(m.num_accepted_tokens for m in base))
    assert math.isclose(r, summed) and lo < r < hi < 1.0  # 20% fewer over 30 prompts: the interval says so
    r, lo, hi = adaptive.count_ratio(prompts(2.0, 0.3), prompts(2.0, 0.3), "verifying_tokens_per_accepted")
    assert lo < 1.0 < hi  # the same work up to noise: no difference found
    assert adaptive.count_ratio(fewer[:1], base[:1], "drafted_per_accepted")[1:] == (0.0, math.inf)
