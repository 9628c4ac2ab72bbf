"""Acceptance rules of greedy, relaxed and tree speculative decoding, and their spec strings.

THEORY.md section 3: every single-candidate rule accepts the drafter's greedy token x_d iff p(x_d) clears a
threshold tau(p), so the tokens it rejects form a lower level set of the target distribution p.

============================  ===========================================  ==========================
spec                          accepts x_d iff                              origin
============================  ===========================================  ==========================
``greedy``                    x_d is the unique argmax of p                exact greedy decoding
``additive:t``                p(x_d) >= p(x0) - t                          relaxed (TRT-LLM delta)
``multiplicative:a``          p(x_d) >= a * p(x0),  0 < a <= 1             relaxed
``topm:m``                    p(x_d) > p_(m+1): x_d is in the top m of p   relaxed (TRT-LLM top-K)
``typical:eps,delta[,off]``   p(x_d) > min(eps, delta * exp(-H(p)))        Medusa typical acceptance
``A&B``, ``A|B``              all of / any of the rules                    combinations
``tree:m``                    x0 is among the drafter's top-m tokens       greedy tree decoding
============================  ===========================================  ==========================

Conventions (worst case, so that rejection regions are closed; THEORY.md section 2):

- ties count against acceptance: ``topm:m`` rejects a token tied with the (m+1)-th; when the drafter has several
  greedy tokens, the draft is accepted only if the rule accepts every one of them; a tree rule fails if some target
  greedy token is not in the drafter's top m under some tie-breaking;
- a token the target masks (logit -inf, p = 0) is always rejected, whatever the rule's threshold;
- ``&`` binds tighter than ``|``: ``topm:10&additive:0.6|greedy`` is (top-10 and additive 0.6) or greedy.
  TensorRT-LLM's relaxed acceptance (its published setting) is ``topm:10&additive:0.6``.
- ``typical``'s optional third number is added to p inside the entropy's log: Medusa and vLLM use ``1e-5``
  (``typical:0.09,0.3,1e-05``); the default 0 is the exact entropy of THEORY.md.

Internally a single-candidate rule reports, per row, its *reject level* R: the largest target logit it rejects,
so that a token is rejected iff its logit <= R. Combinations then reduce to ``max`` (all-of) and ``min`` (any-of).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from specert.stats import TargetStats


class Rule:
    """An acceptance rule. ``str(rule)`` is its spec string; ``rule(str(r)) == r``."""

    @property
    def spec(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if the rule cannot apply to a vocabulary of this size."""

    @property
    def needs_entropy(self) -> bool:
        """Whether the rule reads the target's Shannon entropy (gathered in the same pass as the normaliser)."""
        return False


class SingleCandidateRule(Rule):
    """A rule that accepts or rejects the drafter's greedy token by its target probability."""

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        """Largest target logit the rule rejects, ``[n]`` in the compute dtype of ``stats``."""
        raise NotImplementedError


def _level(stats: TargetStats, threshold: torch.Tensor, strict: bool) -> torch.Tensor:
    """Reject level for the rule "accept iff logit > threshold" (``strict``) or ">= threshold".

    ``threshold`` is float64 ``[n]`` in logit space (log tau + lse); it is rounded *down* to the compute dtype so
    that comparing a logit with the level in that dtype decides exactly as the float64 comparison would.
    """
    level = threshold.to(stats.logits.dtype)
    too_high = level.double() > threshold if strict else level.double() >= threshold
    down = torch.nextafter(level, torch.full_like(level, float("-inf")))
    return torch.where(too_high, down, level)


def _check_width(r, vocab_size: int) -> None:
    if r.m >= vocab_size:
        raise ValueError(f"rule {r.spec}: m = {r.m} must be smaller than the vocabulary size V = {vocab_size}")


def _positive(value: float, name: str, upper: float | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper:g}]" if upper is not None else "positive and finite"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class TopM(SingleCandidateRule):
    """Accept x_d iff it is among the m most probable target tokens: p(x_d) > p_(m+1). ``m = 1`` is strict greedy."""

    m: int = 1

    def __post_init__(self):
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"topm's m must be a whole number >= 1, got {self.m!r}")

    @property
    def spec(self) -> str:
        return "greedy" if self.m == 1 else f"topm:{self.m}"

    def validate(self, vocab_size: int) -> None:
        _check_width(self, vocab_size)

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        stats.ensure_top(self.m + 1)
        return stats.top_logits[:, self.m]


def greedy() -> TopM:
    return TopM(1)


@dataclass(frozen=True)
class Additive(SingleCandidateRule):
    """Accept x_d iff p(x_d) >= p(x0) - t (relaxed acceptance; TensorRT-LLM's ``relaxed_delta``)."""

    t: float

    def __post_init__(self):
        t = float(self.t)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"additive's t must be >= 0 and finite, got {self.t!r}")
        object.__setattr__(self, "t", t)

    @property
    def spec(self) -> str:
        return f"additive:{self.t!r}"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        gap = torch.exp(stats.top_logp[:, 0]) - self.t  # p(x0) - t
        log_tau = torch.where(gap > 0, torch.log(gap.clamp(min=0)), float("-inf"))
        return _level(stats, log_tau + stats.lse, strict=False)


@dataclass(frozen=True)
class Multiplicative(SingleCandidateRule):
    """Accept x_d iff p(x_d) >= alpha * p(x0), 0 < alpha <= 1."""

    alpha: float

    def __post_init__(self):
        object.__setattr__(self, "alpha", _positive(self.alpha, "multiplicative's alpha", upper=1.0))

    @property
    def spec(self) -> str:
        return f"multiplicative:{self.alpha!r}"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        # In logit space directly (no round trip through the normaliser): alpha = 1 accepts exact ties only.
        return _level(stats, stats.top_logits[:, 0].double() + math.log(self.alpha), strict=False)


@dataclass(frozen=True)
class Typical(SingleCandidateRule):
    """Medusa's typical acceptance: accept x_d iff p(x_d) > min(eps, delta * exp(-H(p))).

    ``offset`` is added inside the entropy's log, H = -sum p log(p + offset); Medusa and vLLM use 1e-5.
    """

    eps: float = 0.09
    delta: float = 0.3
    offset: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "eps", _positive(self.eps, "typical's eps (posterior threshold)"))
        object.__setattr__(self, "delta", _positive(self.delta, "typical's delta (posterior alpha)"))
        offset = float(self.offset)
        if not math.isfinite(offset) or offset < 0:
            raise ValueError(f"typical's entropy offset must be >= 0 and finite, got {self.offset!r}")
        object.__setattr__(self, "offset", offset)

    @property
    def spec(self) -> str:
        extra = f",{self.offset!r}" if self.offset else ""
        return f"typical:{self.eps!r},{self.delta!r}{extra}"

    @property
    def needs_entropy(self) -> bool:
        return self.offset == 0.0

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        log_tau = torch.clamp(math.log(self.delta) - stats.entropy(self.offset), max=math.log(self.eps))
        return _level(stats, log_tau + stats.lse, strict=True)


@dataclass(frozen=True)
class _Combination(SingleCandidateRule):
    """Rules combined by their reject levels (``joiner`` in specs; ``kind`` in messages)."""

    rules: tuple[SingleCandidateRule, ...]
    joiner: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self):
        _check_parts(self.rules, self.kind)

    @property
    def spec(self) -> str:
        return self.joiner.join(r.spec for r in self.rules)

    def validate(self, vocab_size: int) -> None:
        for r in self.rules:
            r.validate(vocab_size)

    @property
    def needs_entropy(self) -> bool:
        return any(r.needs_entropy for r in self.rules)

    def _levels(self, stats: TargetStats) -> torch.Tensor:
        return torch.stack([r.reject_level(stats) for r in self.rules])  # [rules, n]


@dataclass(frozen=True)
class AllOf(_Combination):
    """Accept iff every rule accepts: the reject level is the largest of theirs."""

    joiner: ClassVar[str] = "&"
    kind: ClassVar[str] = "all-of"

    def __post_init__(self):
        super().__post_init__()
        if any(isinstance(r, AnyOf) for r in self.rules):
            raise ValueError("an all-of cannot contain an any-of: write it as an any-of of all-ofs (A&B|A&C)")

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        return self._levels(stats).amax(0)


@dataclass(frozen=True)
class AnyOf(_Combination):
    """Accept iff some rule accepts: the reject level is the smallest of theirs."""

    joiner: ClassVar[str] = "|"
    kind: ClassVar[str] = "any-of"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        return self._levels(stats).amin(0)


def _check_parts(rules, kind: str) -> None:
    if not isinstance(rules, tuple) or len(rules) < 2:
        raise ValueError(f"an {kind} rule needs a tuple of at least two rules")
    for r in rules:
        if not isinstance(r, SingleCandidateRule):
            raise ValueError(f"an {kind} rule combines single-candidate rules; {r} cannot be combined")


@dataclass(frozen=True)
class Tree(Rule):
    """Greedy tree decoding with top-m coverage: the path survives iff x0 is among the drafter's top-m tokens."""

    m: int

    def __post_init__(self):
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"tree's m must be a whole number >= 1, got {self.m!r}")

    @property
    def spec(self) -> str:
        return f"tree:{self.m}"

    def validate(self, vocab_size: int) -> None:
        _check_width(self, vocab_size)


# The standard rule set of THEORY.md and `specert eval`.
STANDARD_RULES = (
    "greedy",
    "additive:0.1",
    "additive:0.3",
    "multiplicative:0.5",
    "multiplicative:0.1",
    "topm:2",
    "topm:4",
    "typical:0.09,0.3",
    "topm:10&additive:0.6",
    "tree:2",
    "tree:4",
    "tree:8",
)

_SPEC_HELP = "greedy, additive:T, multiplicative:A, topm:M, typical:EPS,DELTA[,OFFSET], tree:M, A&B, A|B"


def _numbers(name: str, args: str, count: tuple[int, int], spec: str) -> list[float]:
    parts = [a for a in args.split(",")] if args else []
    if not count[0] <= len(parts) <= count[1]:
        want = str(count[0]) if count[0] == count[1] else f"{count[0]} to {count[1]}"
        raise ValueError(f"rule spec {spec!r}: {name} takes {want} number(s), got {len(parts)}")
    try:
        return [float(a) for a in parts]
    except ValueError:
        raise ValueError(f"rule spec {spec!r}: {name}'s arguments must be numbers, got {args!r}") from None


def _whole(name: str, args: str, spec: str) -> int:
    try:
        return int(args)
    except ValueError:
        raise ValueError(f"rule spec {spec!r}: {name} takes one whole number, got {args!r}") from None


def _parse_one(text: str, spec: str) -> Rule:
    name, _, args = text.strip().partition(":")
    name = name.strip().lower()
    args = args.strip()
    try:
        if name == "greedy":
            if args:
                raise ValueError("greedy takes no argument")
            return TopM(1)
        if name == "topm":
            return TopM(_whole(name, args, spec))
        if name == "tree":
            return Tree(_whole(name, args, spec))
        if name == "additive":
            return Additive(*_numbers(name, args, (1, 1), spec))
        if name == "multiplicative":
            return Multiplicative(*_numbers(name, args, (1, 1), spec))
        if name == "typical":
            return Typical(*_numbers(name, args, (0, 3), spec))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("rule spec") else f"rule spec {spec!r}: {msg}") from None
    raise ValueError(f"rule spec {spec!r}: unknown rule {name!r}; known rules: {_SPEC_HELP}")


def parse_rule(spec: str) -> Rule:
    """Parse a spec string such as ``greedy``, ``typical:0.09,0.3`` or ``topm:10&additive:0.6``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a rule spec must be a non-empty string such as 'greedy'; known rules: {_SPEC_HELP}")
    alternatives = []
    for alt in spec.split("|"):
        parts = [_parse_one(p, spec) for p in alt.split("&")]
        alternatives.append(parts[0] if len(parts) == 1 else _combine(AllOf, parts, spec))
    return alternatives[0] if len(alternatives) == 1 else _combine(AnyOf, alternatives, spec)


def _combine(kind, parts, spec):
    try:
        return kind(tuple(parts))
    except ValueError as e:
        raise ValueError(f"rule spec {spec!r}: {e}") from None


def rule(spec: str | Rule) -> Rule:
    """A rule object from a spec string; a rule object is returned as it is.

    >>> str(rule("topm:10&additive:0.6"))
    'topm:10&additive:0.6'
    """
    if isinstance(spec, Rule):
        return spec
    return parse_rule(spec)
