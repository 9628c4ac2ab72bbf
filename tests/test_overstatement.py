"""Certificates never overstate: the fast float64 code against 60-digit arithmetic (``tests/exact.py``), for every
standard rule, ``threshold:0.2`` and the engines' presets, from float64 and float32 logits, on the distributions
where rounding decides most: near ties, near point masses, extreme scales and tokens at a rule's threshold.

The exact reference is itself checked against the brute-force minimisation of ``tests/reference.py``.
"""

import math

import numpy as np
import pytest

import exact
import reference
import specert
from specert.theory.rules import rule

FAST = 252  # least cases per rule of each (family, dtype): 2016 per rule in all, over 8 of them
SLOW = 25_000  # 10^5 per rule and dtype over the 4 families


@pytest.mark.parametrize("cases", [FAST, pytest.param(SLOW, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", exact.FAMILIES)
def test_certificates_never_overstate(family, dtype, cases):
    found = exact.tally(family, dtype, cases)
    assert set(found) == set(exact.RULES)
    over = {spec: (t.overstated, t.cases, t.worst_over, t.example) for spec, t in found.items() if t.overstated}
    assert not over, f"certificates above the exact value ({family}, {np.dtype(dtype).name}): {over}"
    assert min(t.cases for t in found.values()) >= cases


@pytest.mark.parametrize("cases", [26, pytest.param(390, marks=pytest.mark.slow)])
def test_exact_reference_equals_brute_force(cases):
    """The 60-digit water-filling against scipy's constrained minimisation over every way to be rejected."""
    specs = ["greedy", "additive:0.1", "additive:0.3", "multiplicative:0.5", "topm:2", "typical:0.09,0.3",
             "medusa", "threshold:0.2", "topm:2&additive:0.3", "greedy|multiplicative:0.5", "tree:1", "tree:2",
             "tree:3"]
    rng = np.random.default_rng([17, cases])
    for i in range(cases):
        r = rule(specs[i % len(specs)])
        x = reference.random_logits(rng, int(rng.integers(exact.width(r), 6)))
        value, brute = float(exact.exact_certificate(x, r)), reference.brute_certificate(reference.softmax(x), r)
        if math.isinf(brute):
            assert math.isinf(value), (r.spec, x)
        else:
            assert value == pytest.approx(brute, abs=1e-6), (r.spec, x)


def test_exact_reference_agrees_with_the_fast_certificates():
    """On ordinary distributions the two agree to the fast code's rounding, and never the other way round."""
    rng = np.random.default_rng(5)
    for _ in range(150):
        x = reference.random_logits(rng, int(rng.integers(2, 17)))
        target = exact.ExactTarget(x)
        rules = [r for r in map(rule, exact.RULES) if exact.width(r) <= len(x)]
        for spec, fast in specert.certificates(x, rules).items():
            value = float(target.certificate(spec))
            assert fast <= value and fast == pytest.approx(value, rel=1e-9, abs=1e-300), (spec, x)


@pytest.mark.parametrize("x, spec, value", [
    ([0.0, 0.0], "greedy", 0.0),  # a tie: rejected at no cost
    ([0.0, -math.inf], "greedy", math.log(2)),  # a point mass: the supremum
    ([0.0, -math.inf, -math.inf], "tree:2", math.log(3)),
    ([1.0, 0.0], "additive:0.9", math.inf),  # no token rejected
    ([math.log(0.7), math.log(0.3)], "greedy", 0.7 * math.log(1.4) + 0.3 * math.log(0.6)),
])
def test_exact_reference_edge_cases(x, spec, value):
    assert float(exact.exact_certificate(x, spec)) == pytest.approx(value, rel=1e-15, abs=0)
