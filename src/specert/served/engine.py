"""The engine cross-check: an engine's own speculative-decoding counters beside specert's replay of the same drafts.

A vLLM server started with ``--speculative-config`` counts its drafts in Prometheus counters
(``vllm/v1/spec_decode/metrics.py:41-49`` and ``:229-258`` in vLLM 0.32.0). :func:`crosscheck` reads them before and
after running prompts greedily, and replays the engine's greedy speculative decoding on the server's own greedy
texts (:func:`replay`), with the same proposer: vLLM's n-gram proposer, re-implemented token for token
(:mod:`specert.drafters.vllm_ngram`), or a draft model's greedy tokens. For a deterministic proposer the two sets of
figures agree exactly.

Glossary (vLLM's counters; all four summed over the ``engine`` and ``model_name`` labels):

======================================================  ================================================================
counter                                                 counts
======================================================  ================================================================
``vllm:spec_decode_num_drafts_total``                   engine steps whose request had drafted tokens scheduled (a step
                                                        with an empty draft is not a draft)
``vllm:spec_decode_num_draft_tokens_total``             drafted tokens scheduled at those steps
``vllm:spec_decode_num_accepted_tokens_total``          drafted tokens accepted: the common prefix of the draft and the
                                                        target's greedy tokens (a step emits accepted + 1 tokens)
``vllm:spec_decode_num_accepted_tokens_per_pos_total``  per draft position i (label ``position``): drafts that accepted
                                                        more than i tokens
======================================================  ================================================================

Derived, as vLLM defines them (``metrics.py:182-195``): mean acceptance length = 1 + accepted / drafts (the bonus
token included), acceptance rate = accepted / draft tokens, per-position rate i = accepted at i / drafts.

How vLLM's greedy speculative decoding runs, which :func:`replay` follows (a request at temperature 0, alone):

- the first step is the prefill; it emits the first token and drafts nothing;
- after every step the proposer drafts from the prompt and every token emitted so far (``gpu_model_runner.py``,
  ``propose_draft_token_ids``); the next step verifies that draft, emits the target's greedy token at every drafted
  position up to and including the first mismatch, plus the bonus token after a draft accepted in full
  (``vllm/v1/sample/rejection_sampler.py``, greedy path), and counts ``observe_draft(len(draft), emitted - 1)``
  (``vllm/v1/core/sched/scheduler.py:2110-2135``);
- drafts are not cut at ``max_tokens`` nor at EOS (only ``max_model_len`` cuts them, ``scheduler.py:715-721`` and
  ``861-876``): a step may count acceptances of tokens past the end of the returned text. The replay therefore
  needs the greedy text to run ``k - 1`` tokens past ``max_tokens`` (and past EOS), which the cross-check asks for
  in a second request;
- the request ends after the step whose tokens reach ``max_tokens`` or EOS; no draft is proposed after it;
- a prompt served from the prefix cache may count one draft more, none of it accepted: a 769-token Spec-Bench
  prompt (summarization) asked a second time counts 17 drafts against 16 the first time, with the same text and
  accepted counts; with ``--no-enable-prefix-caching``, or prompts new to the server, the counts are the replay's.
  The cross-check therefore wants a server started without prefix caching, or prompts it has not seen.

A draft model (``{"method": "draft_model", ...}``, ``draft_sample_method`` greedy by default) drafts k tokens at
every step, each its greedy token after the tokens before it. Its draft agrees with the text for as long as its
greedy tokens *along the text* (teacher-forced) do, so the accepted count needs only those: one forward of the draft
model over the text (:func:`teacher_forced_greedy`). Past the first mismatch the replay's draft tokens differ from the
engine's, which no counter sees. Agreement is then exact except where the in-process model and the engine's round a
near-tie (two logits within float32 rounding) differently, which flips one draft token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from prometheus_client.parser import text_string_to_metric_families

from specert.decoding.forward import forward, new_cache
from specert.decoding.models import LoadedModel, load_model
from specert.drafters.vllm_ngram import check_lookup, vllm_ngram_draft
from specert.served.client import ServedError, ServedModel

# Prometheus sample names of vLLM's counters, and the SpecCounts field each one fills.
COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "num_drafts",
    "vllm:spec_decode_num_draft_tokens_total": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "num_accepted_tokens",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


@dataclass
class SpecCounts:
    """vLLM's speculative-decoding counters (the module docstring's glossary), read from an engine or replayed."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k] drafts that accepted more than i tokens

    def observe_draft(self, draft_tokens: int, accepted: int) -> None:
        """Count one draft of ``draft_tokens`` tokens of which the first ``accepted`` were accepted (vLLM's
        ``SpecDecodingStats.observe_draft``)."""
        if not 0 <= accepted <= draft_tokens:
            raise ValueError(f"accepted tokens must lie in [0, draft_tokens = {draft_tokens}], got {accepted}")
        self.num_drafts += 1
        self.num_draft_tokens += draft_tokens
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < draft_tokens:
            self.accepted_per_position += [0] * (draft_tokens - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def _combine(self, other: SpecCounts, sign: int) -> SpecCounts:
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = self.accepted_per_position + [0] * (n - len(self.accepted_per_position))
        theirs = other.accepted_per_position + [0] * (n - len(other.accepted_per_position))
        return SpecCounts(self.num_drafts + sign * other.num_drafts,
                          self.num_draft_tokens + sign * other.num_draft_tokens,
                          self.num_accepted_tokens + sign * other.num_accepted_tokens,
                          [a + sign * b for a, b in zip(mine, theirs)])

    def __add__(self, other: SpecCounts) -> SpecCounts:
        return self._combine(other, 1)

    def __sub__(self, other: SpecCounts) -> SpecCounts:
        """The counts between two readings: ``after - before`` (the shorter per-position list padded with 0)."""
        return self._combine(other, -1)

    def same_as(self, other: SpecCounts) -> bool:
        """Whether both hold the same counts (per-position lists compared after padding with 0)."""
        d = self - other
        return d.num_drafts == d.num_draft_tokens == d.num_accepted_tokens == 0 and not any(d.accepted_per_position)

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens per verifying step, the bonus token included (NaN without drafts)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """accepted / draft tokens (NaN without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """accepted at position i / drafts, per position (vLLM's per-position rate; empty without drafts)."""
        return [a / self.num_drafts for a in self.accepted_per_position] if self.num_drafts else []


def read_spec_counts(text: str) -> SpecCounts | None:
    """vLLM's speculative-decoding counters from Prometheus text (``GET /metrics``; several servers' texts may be
    concatenated), summed over every label but ``position``; None when the text has none (a server that does not
    speculate)."""
    counts, found, per_position = SpecCounts(), False, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                name = COUNTERS[sample.name]
                setattr(counts, name, getattr(counts, name) + int(sample.value))
                found = True
            elif sample.name == PER_POSITION:
                position = int(sample.labels["position"])
                per_position[position] = per_position.get(position, 0) + int(sample.value)
    counts.accepted_per_position = [per_position.get(i, 0) for i in range(max(per_position, default=-1) + 1)]
    return counts if found else None


def replay(text: Sequence[int], max_tokens: int, propose: Callable[[int], Sequence[int]],
           eos: Collection[int] = ()) -> SpecCounts:
    """The counters vLLM's greedy speculative decoding shows for one request whose greedy continuation is ``text``
    (the module docstring's steps).

    Args:
        text: the target's greedy continuation of the prompt, at least ``max_tokens + k - 1`` tokens long (or to
            ``k - 1`` tokens past the first EOS): drafts are not cut at the end of the output, and their
            acceptances there are counted.
        max_tokens: the request's ``max_tokens``.
        propose: ``propose(n)``, the draft after the prompt and ``text[:n]`` (empty: no draft at that step).
        eos: token ids that end the request (empty: the request ignores EOS, ``ignore_eos``).

    Returns the counts: one draft per step whose draft is not empty, accepted = the common prefix of the draft and
    the text there.

    >>> c = replay([7, 1, 2, 3, 1, 2, 3], 4, lambda n: [1, 2, 3] if n == 1 else [])
    >>> (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, c.accepted_per_position)
    (1, 3, 3, [1, 1, 1])
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    stop = max_tokens
    ends = [i for i, t in enumerate(text[:max_tokens]) if t in eos]
    if ends:
        stop = ends[0] + 1
    if len(text) < stop:
        raise ValueError(f"the text has {len(text)} tokens but the request generates {stop}: give the greedy "
                         f"continuation to max_tokens and k - 1 tokens beyond")
    counts = SpecCounts()
    n = 1  # the prefill step emits text[0] and drafts nothing
    while n < stop:
        draft = list(propose(n))
        accepted = 0
        while accepted < len(draft) and n + accepted < len(text) and draft[accepted] == text[n + accepted]:
            accepted += 1
        if accepted < len(draft) and n + accepted == len(text):
            raise ValueError(f"the text ends at {len(text)} tokens, inside the draft of the step at token {n}: give "
                             f"the greedy continuation k - 1 tokens past max_tokens (drafts run past the output)")
        if draft:
            counts.observe_draft(len(draft), accepted)
        n += accepted + 1
    return counts


def teacher_forced_greedy(model: LoadedModel, tokens: Sequence[int]) -> list[int]:
    """The model's greedy token after each prefix of ``tokens``: ``out[i]`` = argmax after ``tokens[:i + 1]``
    (ties: the lowest id, as vLLM's greedy sampler), from one forward."""
    with torch.inference_mode():
        logits = forward(model.model, new_cache(model.model), list(tokens))  # [T, V]
    return logits.argmax(-1).tolist()


@dataclass(frozen=True)
class NgramConfig:
    """vLLM's n-gram proposer, ``--speculative-config '{"method": "ngram", ...}'`` (the same names).
    ``max_model_len`` None: the served model's (:func:`crosscheck` asks the server)."""

    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    max_model_len: int | None = None

    def __post_init__(self):
        check_lookup(self.prompt_lookup_min, self.prompt_lookup_max)
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")

    def speculative_config(self) -> str:
        """The JSON of vLLM's ``--speculative-config`` for this proposer."""
        return json.dumps({"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                           "prompt_lookup_min": self.prompt_lookup_min, "prompt_lookup_max": self.prompt_lookup_max})

    def drafts(self, prompt: Sequence[int], text: Sequence[int]) -> Callable[[int], list[int]]:
        """``propose(n)`` for :func:`replay`: the n-gram draft after ``prompt`` and ``text[:n]``."""
        context = list(prompt) + list(text)
        return lambda n: vllm_ngram_draft(context[: len(prompt) + n], self.prompt_lookup_min, self.prompt_lookup_max,
                                          self.num_speculative_tokens, self.max_model_len)


@dataclass(frozen=True)
class DraftModelConfig:
    """vLLM's draft-model proposer, ``--speculative-config '{"method": "draft_model", "model": ..., ...}'``, greedy.

    ``greedy``: the draft model's teacher-forced greedy tokens along a token sequence (``greedy(tokens)[i]`` its
    token after ``tokens[:i + 1]``); None: :func:`teacher_forced_greedy` of ``model`` loaded in process. Drafts cut
    by ``max_model_len`` (a context within k tokens of the model's limit) are not modelled."""

    model: str
    num_speculative_tokens: int
    greedy: Callable[[list[int]], list[int]] | None = None

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")

    def speculative_config(self) -> str:
        """The JSON of vLLM's ``--speculative-config`` for this proposer."""
        return json.dumps({"method": "draft_model", "model": self.model,
                           "num_speculative_tokens": self.num_speculative_tokens})

    def drafts(self, prompt: Sequence[int], text: Sequence[int]) -> Callable[[int], list[int]]:
        """``propose(n)`` for :func:`replay`: k of the draft model's teacher-forced greedy tokens from ``text[n]``
        on, which agree with its own draft up to and including the first token that differs from the text."""
        greedy = self.greedy or (lambda tokens: teacher_forced_greedy(load_model(self.model), tokens))
        along = greedy(list(prompt) + list(text)[:-1])[len(prompt) - 1 :]  # [len(text)]: after prompt + text[:j]
        k = self.num_speculative_tokens

        def propose(n: int) -> list[int]:
            if n + k > len(along):
                raise ValueError(f"the text has {len(text)} tokens; a draft of {k} at token {n} needs {n + k}: give "
                                 "the greedy continuation k - 1 tokens past max_tokens")
            return along[n : n + k]

        return propose


class CrossCheck(NamedTuple):
    """What :func:`crosscheck` found."""

    engine: SpecCounts  # the server's counters: after - before
    replay: SpecCounts  # specert's replay on the server's greedy texts
    outputs: list[list[int]]  # the server's greedy outputs of the measured requests
    texts: list[list[int]]  # the greedy texts replayed: each output's, k tokens past max_tokens, through EOS


def _complete(server: ServedModel, prompt: list[int], max_tokens: int, ignore_eos: bool) -> list[int]:
    """The server's greedy output ids for ``prompt``."""
    reply = server._request("POST", "/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": ignore_eos, "return_token_ids": True, "skip_special_tokens": False})
    return [int(t) for t in reply["choices"][0]["token_ids"]]


def crosscheck(server: ServedModel, prompts: Sequence[Sequence[int]], max_tokens: int,
               proposer: NgramConfig | DraftModelConfig, eos: Collection[int] = ()) -> CrossCheck:
    """Run ``prompts`` (token ids) greedily through a speculating server, one at a time, and return its counters'
    increase beside specert's replay of the same proposer on the server's own greedy texts.

    The server must be otherwise idle between the two readings of ``/metrics`` (its counters count every request),
    and speculate with ``proposer`` (its ``--speculative-config``: :meth:`NgramConfig.speculative_config`). With
    ``eos`` empty the requests ignore EOS and generate ``max_tokens`` tokens each; with the server's EOS ids given,
    they stop there, and so does the replay. Each prompt's greedy text is then asked again, ``k`` tokens longer and
    past EOS, for the replay (drafts run past the output); that request must repeat the measured output, else this
    raises :class:`~specert.served.client.ServedError`.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("crosscheck needs at least one prompt, each of at least one token")
    entry = server.check()
    if isinstance(proposer, NgramConfig) and proposer.max_model_len is None:
        proposer = replace(proposer, max_model_len=int(entry.get("max_model_len") or 10**9))
    before = read_spec_counts(server.metrics())
    if before is None:
        raise ServedError(f"{server.name} shows no vllm:spec_decode counters in /metrics: start it with "
                          f"--speculative-config '{proposer.speculative_config()}'")
    outputs = [_complete(server, list(p), max_tokens, ignore_eos=not eos) for p in prompts]
    engine = read_spec_counts(server.metrics()) - before
    k = proposer.num_speculative_tokens
    replayed, texts = SpecCounts(accepted_per_position=[0] * k), []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        text = _complete(server, list(prompt), max_tokens + k, ignore_eos=True)
        texts.append(text)
        if text[: len(output)] != output:
            at = next((j for j, (a, b) in enumerate(zip(output, text)) if a != b), len(text))
            raise ServedError(f"prompt {i}: the server's greedy text changed between two identical requests at token "
                              f"{at} (a near-tie rounded two ways by different batches of work)")
        ends = [j + 1 for j, t in enumerate(text[:max_tokens]) if t in eos]
        if len(output) != min(ends + [max_tokens]):
            raise ServedError(f"prompt {i}: the server stopped after {len(output)} tokens, not where eos "
                              f"{sorted(eos)} and max_tokens {max_tokens} end it: give the server's EOS ids")
        replayed += replay(text, max_tokens, proposer.drafts(prompt, text), eos)
    return CrossCheck(engine, replayed, outputs, texts)
