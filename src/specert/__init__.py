"""specert: when is a draft accepted? Exact acceptance certificates for speculative decoding.

The mathematics follows "When Is a Draft Accepted? A Theory of Acceptance in Speculative Decoding"
(arXiv 2606.30265); p is always the target distribution, q the drafter's, and KL(p || q) is target first.
"""

from specert.acceptance import accepts
from specert.bounds import margin, margin_bounds
from specert.certificates import certificate, certificates, drafter_certificate, extremal_drafter
from specert.divergence import kl, stochastic_acceptance
from specert.rules import STANDARD_RULES, Rule, rule

__all__ = [
    "STANDARD_RULES",
    "Rule",
    "accepts",
    "certificate",
    "certificates",
    "drafter_certificate",
    "extremal_drafter",
    "kl",
    "margin",
    "margin_bounds",
    "rule",
    "stochastic_acceptance",
]
__version__ = "0.1.0"
