"""Acceptance rules of greedy, relaxed and tree speculative decoding, and their spec strings.

THEORY.md section 3: every single-candidate rule accepts the drafter's greedy token x_d iff p(x_d) clears a
threshold tau(p), so the tokens it rejects form a lower level set of the target distribution p.

============================  ===========================================  ==========================
spec                          accepts x_d iff                              origin
============================  ===========================================  ==========================
``greedy``                    x_d is the unique argmax of p                exact greedy decoding
``additive:t``                p(x_d) >= p(x0) - t,  0 <= t < 1             relaxed (TRT-LLM delta)
``multiplicative:a``          p(x_d) >= a * p(x0),  0 < a <= 1             relaxed
``topm:m``                    p(x_d) > p_(m+1): x_d is in the top m of p   relaxed (TRT-LLM top-K)
``typical:eps,delta[,off]``   p(x_d) > min(eps, delta * exp(-H(p)))        Medusa typical acceptance
``threshold:tau``             p(x_d) >= tau, a fixed floor, 0 < tau <= 1   SGLang's single-token floor
``A&B``, ``A|B``              all of / any of the rules                    combinations
``tree:m``                    x0 is among the drafter's top-m tokens       greedy tree decoding
============================  ===========================================  ==========================

Conventions (worst case, so that rejection regions are closed; THEORY.md section 2):

- ties count against acceptance: ``topm:m`` rejects a token tied with the (m+1)-th; when the drafter has several
  greedy tokens, the draft is accepted only if the rule accepts every one of them; a tree rule fails if some target
  greedy token is not in the drafter's top m under some tie-breaking;
- a token the target masks (logit -inf, p = 0) is always rejected, whatever the rule's threshold;
- a rule that would accept every draft by construction is refused: ``additive:t`` with t >= 1 (p(x0) - t <= 0),
  ``topm:m`` and ``tree:m`` with m >= V (:meth:`Rule.validate`, once V is known);
- ``&`` binds tighter than ``|``: ``topm:10&additive:0.6|greedy`` is (top-10 and additive 0.6) or greedy.
  TensorRT-LLM's relaxed acceptance (its published setting) is ``topm:10&additive:0.6``.
- ``typical``'s optional third number is added to p inside the entropy's log: Medusa and vLLM use ``1e-5``
  (``typical:0.09,0.3,1e-05``); the default 0 is the exact entropy of THEORY.md.

Internally a single-candidate rule reports, per row, its *reject level* R: the largest target logit it rejects,
so that a token is rejected iff its logit <= R. Combinations then reduce to ``max`` (all-of) and ``min`` (any-of).

Presets: the rules inference engines ship, by name. A preset is an alias: it parses to the rule objects above and
prints back as their canonical spec (``str(rule("trtllm-relaxed")) == "topm:10&additive:0.6"``). Every engine
judges its own target distribution p, which is not always the softmax of the raw logits that specert certifies:

==============================  ==============================  ===================================================
preset                          rule                            engine, and where specert's reading differs
==============================  ==============================  ===================================================
``trtllm-relaxed[:K,DELTA]``    ``topm:K&additive:DELTA``       TensorRT-LLM MTP relaxed acceptance (merged, PR
                                (default 10, 0.6)               #3865): ``mtpRelaxedAcceptanceKernel``; p =
                                                                softmax(z) at temperature 1 whatever the request's;
                                                                only inside ``<think>`` spans (DELTA = 0 outside);
                                                                ``torch.topk`` breaks ties at the K-th rank
``vllm-relaxed[:K,R]``          ``topm:K&multiplicative:R``     vLLM relaxed acceptance for thinking, *proposed and
                                (default 3, 0.5)                never merged* (PRs #22238, #43184, #45229, closed);
                                                                greedy requests, ``<think>`` spans only
``sglang-threshold:TAU``        ``threshold:TAU``               SGLang ``speculative_accept_threshold_single``: the
                                                                deterministic clause ``p(d) >= TAU`` only (the
                                                                engine also accepts by a coin); p after temperature,
                                                                top-k and top-p; unused when a batch is all greedy
``medusa[:EPS,DELTA]``          ``typical:EPS,DELTA,1e-05``     Medusa ``evaluate_posterior`` (fast typical) and
                                (default 0.09, 0.3)             vLLM V0 ``TypicalAcceptanceSampler``; p =
                                                                softmax(z / T) (vLLM: after its logits processing);
                                                                at T = 0 both match the argmax exactly
==============================  ==============================  ===================================================

Every preset counts ties against acceptance, as all specert rules do: ``topm:K`` rejects a token tied with the
(K+1)-th, where the engine's top-k keeps one of the tied tokens by its own order. The sources, with versions, are in
each preset function's docstring (:func:`trtllm_relaxed`, :func:`vllm_relaxed`, :func:`sglang_threshold`,
:func:`medusa`).

One module: a rule and its spec string are defined together (each class prints the spec that :func:`parse_rule`
reads back, ``rule(str(r)) == r``, and a preset is an alias of the classes), so the grammar, its printer and its
parser change in one place; every reject level is rounded by the same private helpers (``_levels``, ``_ulps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from specert.theory.stats import TargetStats


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
    """A rule that accepts or rejects the drafter's greedy token by its target probability.

    Two readings of its reject level. :meth:`reject_level` decides as the rule computed in floating point does
    (what a decoder's verifier does: :func:`~specert.theory.acceptance.accepts`). :meth:`reject_range` brackets
    the level of the rule applied to the exact distribution of the logits, in exact arithmetic, given the error
    bounds of the statistics (``stats.s_rtol``, ``stats.entropy_error``): certificates use its upper end, so that a
    token the exact rule might reject is counted as rejected and the certificate never overstates.
    """

    # Whether the rule accepts iff p > its threshold (strict) or iff p >= it.
    strict: ClassVar[bool] = False

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        """Largest target logit the rule rejects, ``[n]`` in the compute dtype of ``stats``."""
        raise NotImplementedError

    def reject_range(self, stats: TargetStats) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` ``[n]`` in the compute dtype of ``stats``: every token of logit <= lo is rejected by the exact
        rule, every token it rejects has logit <= hi."""
        return self.reject_end(stats, upper=False), self.reject_end(stats, upper=True)

    def reject_bound(self, stats: TargetStats) -> torch.Tensor:
        """The upper end of :meth:`reject_range`: the level certificates use."""
        return self.reject_end(stats, upper=True)

    def reject_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        """One end of :meth:`reject_range`: by default the level of :meth:`threshold_end`."""
        return _level_end(stats, self.threshold_end(stats, upper), self.strict, upper)

    def threshold_end(self, stats: TargetStats, upper: bool) -> torch.Tensor | float:
        """One end (the upper if ``upper``) of a bracket of the exact rule's threshold relative to the top logit,
        float64 ``[n]`` or a number: the rule accepts x iff ``l_x - l_1`` exceeds it (or reaches it)."""
        raise NotImplementedError


# Unit roundoff of float64, in which every threshold is computed.
_U = 2.0**-53


def _ulps(x: float, n: int) -> tuple[float, float]:
    """``x`` moved ``n`` ulps down and up: brackets a libm result within n - 1 ulps of its exact value."""
    lo = hi = x
    for _ in range(n):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
    return lo, hi


def _add_directed(a: torch.Tensor, b: torch.Tensor, up: bool) -> torch.Tensor:
    """The float64 nearest a + b on one side: >= a + b (``up``) or <= it. Exact sums stay as they are, so that a
    threshold of l_1 + 0 keeps ties with the top token on the accepted side (TwoSum gives the exact error)."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)  # a + b = s + err exactly (NaN where infinite: s is then exact)
    toward = torch.full_like(s, math.inf if up else -math.inf)
    return torch.where(err > 0 if up else err < 0, torch.nextafter(s, toward), s)


def _level_end(stats: TargetStats, rel, strict: bool, upper: bool) -> torch.Tensor:
    """The level of one end of a bracket of the threshold relative to the top logit (float64 ``[n]`` or a number),
    its sum with the top logit rounded outward (up for the upper end)."""
    top = stats.top_logits[:, 0].double()
    rel = torch.as_tensor(rel, dtype=torch.float64, device=top.device).expand_as(top)
    return _level(stats, _add_directed(top, rel, up=upper), strict)


def _log_s_error(stats: TargetStats) -> torch.Tensor:
    """Bound on the absolute error of ``stats.log_s``: the normaliser's relative error and the log's rounding."""
    return stats.s_rtol * (1 + stats.s_rtol) + 2 * _U * stats.log_s.abs()


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

    def reject_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        return self.reject_level(stats)  # a logit: exact


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
        if t >= 1:  # p(x0) - t <= 0 <= p(x_d) for every distribution: the rule would accept every draft
            raise ValueError(f"additive's t must be < 1, got {self.t!r}: with t >= 1, p(x_d) >= p(x0) - t holds for "
                             "every token, so the rule would accept every draft")
        object.__setattr__(self, "t", t)

    @property
    def spec(self) -> str:
        return f"additive:{self.t!r}"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        gap = torch.exp(stats.top_logp[:, 0]) - self.t  # p(x0) - t
        log_tau = torch.where(gap > 0, torch.log(gap.clamp(min=0)), float("-inf"))
        return _level(stats, log_tau + stats.lse, self.strict)

    def threshold_end(self, stats: TargetStats, upper: bool) -> torch.Tensor | float:
        # p(x) < p(x0) - t  <=>  exp(l_x - l_1) < X = 1 - t S; X bracketed from S's bracket, then its log.
        if self.t == 0:
            return 0.0
        sign = 1 if upper else -1
        big_s = torch.exp(stats.log_s)
        spread = _log_s_error(stats) + 4 * _U
        x = 1 - self.t * big_s * (1 - sign * spread) + sign * 2 * _U * (1 + 2 * self.t * big_s)
        log_x = torch.log(x.clamp(min=0))
        log_x = torch.where(x > 0, log_x + sign * 2 * _U * log_x.abs(), float("-inf"))
        # X < 1 exactly for t > 0: a token tied with the top (a = 0) is always accepted, whatever the rounding.
        return log_x.clamp(max=0.0)


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
        return _level(stats, stats.top_logits[:, 0].double() + math.log(self.alpha), self.strict)

    def threshold_end(self, stats: TargetStats, upper: bool) -> float:
        # p(x) < alpha p(x0)  <=>  l_x < l_1 + log alpha; log(1) = 0 exactly
        return _ulps(math.log(self.alpha), 2)[upper] if self.alpha != 1 else 0.0


@dataclass(frozen=True)
class Typical(SingleCandidateRule):
    """Medusa's typical acceptance: accept x_d iff p(x_d) > min(eps, delta * exp(-H(p))).

    ``offset`` is added inside the entropy's log, H = -sum p log(p + offset); Medusa and vLLM use 1e-5.
    """

    eps: float = 0.09
    delta: float = 0.3
    offset: float = 0.0
    strict: ClassVar[bool] = True

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
        return _level(stats, log_tau + stats.lse, self.strict)

    def threshold_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        # p(x) <= tau  <=>  l_x - l_1 <= log tau + log S, log tau = min(log eps, log delta - H)
        sign = 1 if upper else -1
        h, h_err = stats.entropy(self.offset), stats.entropy_error(self.offset)
        eps, delta = _ulps(math.log(self.eps), 2)[upper], _ulps(math.log(self.delta), 2)[upper]
        rounding = 4 * _U * (abs(math.log(self.eps)) + abs(math.log(self.delta)) + h.abs() + stats.log_s.abs())
        slack = _log_s_error(stats) + rounding
        return torch.clamp(delta - h + sign * h_err, max=eps) + stats.log_s + sign * slack


@dataclass(frozen=True)
class Threshold(SingleCandidateRule):
    """Accept x_d iff p(x_d) >= tau, a fixed floor, 0 < tau <= 1 (SGLang's ``speculative_accept_threshold_single``).

    Non-strict, as SGLang compares (``p >= threshold_single``, although its help text says "greater than").
    """

    tau: float

    def __post_init__(self):
        object.__setattr__(self, "tau", _positive(self.tau, "threshold's tau", upper=1.0))

    @property
    def spec(self) -> str:
        return f"threshold:{self.tau!r}"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        return _level(stats, stats.lse + math.log(self.tau), self.strict)

    def threshold_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        # p(x) < tau  <=>  l_x - l_1 < log tau + log S
        slack = _log_s_error(stats) + 4 * _U * (abs(math.log(self.tau)) + stats.log_s.abs())
        return _ulps(math.log(self.tau), 2)[upper] + stats.log_s + (slack if upper else -slack)


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

    def _ends(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        return torch.stack([r.reject_end(stats, upper) for r in self.rules])  # [rules, n]


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

    def reject_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        return self._ends(stats, upper).amax(0)


@dataclass(frozen=True)
class AnyOf(_Combination):
    """Accept iff some rule accepts: the reject level is the smallest of theirs."""

    joiner: ClassVar[str] = "|"
    kind: ClassVar[str] = "any-of"

    def reject_level(self, stats: TargetStats) -> torch.Tensor:
        return self._levels(stats).amin(0)

    def reject_end(self, stats: TargetStats, upper: bool) -> torch.Tensor:
        return self._ends(stats, upper).amin(0)


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

RULE_GRAMMAR = (
    "greedy, additive:T (0 <= T < 1), multiplicative:A (0 < A <= 1), topm:M, typical:EPS,DELTA[,OFFSET], "
    "threshold:TAU (0 < TAU <= 1), tree:M, A&B, A|B; "
    "presets: trtllm-relaxed[:K,DELTA], vllm-relaxed[:K,R], sglang-threshold:TAU, medusa[:EPS,DELTA]"
)


def trtllm_relaxed(k: int = 10, delta: float = 0.6) -> AllOf:
    """TensorRT-LLM's relaxed acceptance (MTP, DeepSeek-R1 thinking): ``topm:K&additive:DELTA``.

    Accept the draft d iff it is among the K most probable target tokens and p(d) >= p_(1) - DELTA. The defaults
    are TensorRT-LLM's published setting (its config defaults, ``relaxed_topk = 1``, ``relaxed_delta = 0``, make
    the rule strict greedy); Modular MAX and ROCm ATOM ship the same rule with 10 and 0.6 as defaults.

    Source: NVIDIA/TensorRT-LLM ``cpp/tensorrt_llm/kernels/speculativeDecoding/mtpKernels.cu``,
    ``mtpRelaxedAcceptanceKernel`` (commit 3585984b32cded5cc002d3087d3da4b0fd9fb8a5; the kernel keeps a rank-r
    candidate while ``p_(1) - delta <= p_(r)``), driven by ``tensorrt_llm/_torch/speculative/mtp.py``,
    ``MTPWorker.sample_and_accept_draft_tokens`` (commit 000a01de66f0eab4ab05640711f0253f50f5209c), configured by
    ``MTPDecodingConfig`` (``use_relaxed_acceptance_for_thinking``, ``relaxed_topk``, ``relaxed_delta``); merged in
    PR #3865 (2025-04). Where specert's reading differs from the engine:

    - the engine's p is ``softmax(z)`` at temperature 1, whatever the request's temperature;
    - the engine relaxes only inside ``<think>`` ... ``</think>`` spans; outside them DELTA = 0;
    - the engine's ``torch.topk`` keeps one of the tokens tied at the K-th rank by its own order; specert's ``topm``
      rejects every token tied with the (K+1)-th (ties count against acceptance).
    """
    if float(delta) >= 1:  # the additive part would accept every token: the preset would be topm:K alone
        raise ValueError(f"trtllm-relaxed's DELTA must be < 1, got {delta!r}: with DELTA >= 1 it accepts every token "
                         f"of the top K whatever p; write topm:{k} for that")
    return AllOf((TopM(k), Additive(delta)))


def vllm_relaxed(k: int = 3, r: float = 0.5) -> AllOf:
    """vLLM's *proposed* relaxed acceptance for thinking: ``topm:K&multiplicative:R``. It was never merged.

    Accept the draft d iff it is among the K most probable target tokens and p(d) >= R p_(1) (implemented on logits
    as ``z_d >= z_(1) + log R``). The defaults are those hard-coded in the last port, PR #45229 (``relax_top_k = 3``,
    ``relax_ratio = 0.5``); the ROCm validation issue #45752 also tried R = 0.7 with K = 10.

    Source: vllm-project/vllm pull requests #22238 (V1, greedy requests only), #43184 and #45229 (ports of #22238),
    all closed without merge; earlier attempts #21157 (V0) and #21506 (V1, reusing ``posterior_alpha``) closed too.
    No released vLLM (checked up to 0.34.0) ships it. Where specert's reading differs from the proposal: the
    proposal applies only to greedy requests inside ``<think>`` spans, and its top-k keeps one of the tokens tied at
    the K-th rank, where specert's ``topm`` rejects every token tied with the (K+1)-th.
    """
    return AllOf((TopM(k), Multiplicative(r)))


def sglang_threshold(tau: float) -> Threshold:
    """SGLang's deterministic accept floor ``speculative_accept_threshold_single``: ``threshold:TAU``.

    Accept the draft d if p(d) >= TAU (non-strict in the kernel, whatever the help text's "greater than" says).

    Source: sgl-project/sglang ``sgl-kernel/csrc/speculative/speculative_sampling.cuh``,
    ``TreeSpeculativeSamplingTargetOnly`` (commit b227f63247cdaf7fcbc4cfec8c3379120276ec82), now
    ``sglang/kernels/jit/include/sgl_kernel/speculative/sampling.cuh`` (sglang 0.5.23; accept test at line 81);
    option ``--speculative-accept-threshold-single`` (``python/sglang/srt/server_args.py``, sglang 0.4.6.post5;
    default 1.0). Where specert's reading differs from the engine:

    - the engine also accepts by a coin, ``u < sum of sibling p / threshold_acc``; the preset is the part that
      accepts whatever the coin, so it certifies acceptance, not rejection;
    - the engine's p is the request's sampling distribution (temperature, then top-k and top-p renormalised);
    - batches of greedy requests only are verified by exact argmax matching, and the thresholds are unused.
    """
    return Threshold(tau)


def medusa(eps: float = 0.09, delta: float = 0.3) -> Typical:
    """Medusa's typical acceptance as Medusa and vLLM V0 compute it: ``typical:EPS,DELTA,1e-05``.

    Accept the draft d iff p(d) > min(EPS, DELTA exp(-H)), H = -sum_x p(x) log(p(x) + 1e-5) (the offset inside the
    log, multiplied by the un-offset p); strict >.

    Source: FasterDecoding/Medusa ``medusa/model/utils.py``, ``evaluate_posterior``, fast typical branch (commit
    e2a5d20c048a9b0a4092e6933c34313687422518), defaults from ``medusa/model/medusa_model.py``,
    ``MedusaModel.medusa_generate`` (``posterior_threshold = 0.09``, ``posterior_alpha = 0.3``); vLLM V0
    ``vllm/model_executor/layers/typical_acceptance_sampler.py``, ``TypicalAcceptanceSampler.
    _evaluate_accepted_tokens`` (vLLM 0.5.1 to 0.9.2, removed in 0.10.0), same defaults in ``SpeculativeConfig``.
    Where specert's reading differs from the engines:

    - their p is ``softmax(z / T)`` (vLLM: after penalties, top-k, top-p and min-p); at temperature 0 both verify
      by exact argmax matching instead (vLLM turns greedy requests into one-hot p);
    - Medusa's tree picks, among the longest accepted paths, the one of largest sum of log p.
    """
    return Typical(eps, delta, 1e-5)


# Presets by spec name: (the builder, its arguments in specs, how many of them are whole numbers).
PRESETS = {
    "trtllm-relaxed": (trtllm_relaxed, "[:K,DELTA]", 1),
    "vllm-relaxed": (vllm_relaxed, "[:K,R]", 1),
    "sglang-threshold": (sglang_threshold, ":TAU", 0),
    "medusa": (medusa, "[:EPS,DELTA]", 0),
}


def _parse_preset(name: str, args: str, spec: str) -> Rule:
    build, usage, whole = PRESETS[name]
    wanted = usage.count(",") + 1
    given = len(args.split(",")) if args else 0
    if given != wanted and (given or not usage.startswith("[")):
        allowed = f"{wanted} number(s) or none" if usage.startswith("[") else f"{wanted} number(s)"
        raise ValueError(f"rule spec {spec!r}: {name} takes {allowed} ({name}{usage}), got {given}")
    values = _numbers(name, args, (given, given), spec)
    for i in range(min(whole, len(values))):
        if not math.isfinite(values[i]) or values[i] != int(values[i]):
            raise ValueError(f"rule spec {spec!r}: {name}'s first argument must be a whole number, got {values[i]!r}")
        values[i] = int(values[i])
    return build(*values)


def _all_of_parts(r: Rule) -> tuple[Rule, ...]:
    return r.rules if isinstance(r, AllOf) else (r,)


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
        if name == "threshold":
            return Threshold(*_numbers(name, args, (1, 1), spec))
        if name in PRESETS:
            return _parse_preset(name, args, spec)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("rule spec") else f"rule spec {spec!r}: {msg}") from None
    raise ValueError(f"rule spec {spec!r}: unknown rule {name!r}; known rules: {RULE_GRAMMAR}")


def parse_rule(spec: str) -> Rule:
    """Parse a spec string such as ``greedy``, ``typical:0.09,0.3`` or ``topm:10&additive:0.6``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a rule spec must be a non-empty string such as 'greedy'; known rules: {RULE_GRAMMAR}")
    alternatives = []
    for alt in spec.split("|"):
        # a preset may itself be an all-of: splice its parts in, so that the rule prints back as it parses
        parts = [q for p in alt.split("&") for q in _all_of_parts(_parse_one(p, spec))]
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
