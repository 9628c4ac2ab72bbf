"""specert: when is a draft accepted? Exact acceptance certificates for speculative decoding.

The mathematics follows "When Is a Draft Accepted? A Theory of Acceptance in Speculative Decoding"
(arXiv 2606.30265); p is always the target distribution, q the drafter's, and KL(p || q) is target first.
"""

from specert.theory.acceptance import accepts
from specert.theory.bounds import margin, margin_bounds
from specert.theory.certificates import certificate, certificates, drafter_certificate, extremal_drafter
from specert.theory.divergence import kl, stochastic_acceptance
from specert.theory.rules import STANDARD_RULES, Rule, rule
from specert.theory.truncated import (
    Decision,
    Interval,
    TopK,
    decide,
    entropy_interval,
    truncated_accepts,
    truncated_certificate,
    truncated_certificates,
    truncated_kl,
)

__all__ = [
    "STANDARD_RULES",
    "Decision",
    "Interval",
    "Rule",
    "TopK",
    "accepts",
    "certificate",
    "certificates",
    "decide",
    "drafter_certificate",
    "entropy_interval",
    "extremal_drafter",
    "kl",
    "margin",
    "margin_bounds",
    "rule",
    "stochastic_acceptance",
    "truncated_accepts",
    "truncated_certificate",
    "truncated_certificates",
    "truncated_kl",
]
__version__ = "0.1.0"
