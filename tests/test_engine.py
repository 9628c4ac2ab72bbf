"""The engine cross-check (specert.served.engine) and vLLM's n-gram proposer (specert.drafters.vllm_ngram),
without a server: hand-computed cases, a brute-force search, a Prometheus text, and a simulated engine."""

import json

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specert.decoding.loop import generate
from specert.decoding.schedules import make_schedule
from specert.drafters.spec import check_drafter_spec, drafter_from_spec
from specert.drafters.vllm_ngram import VllmNgramDrafter, ngram_match, vllm_ngram_draft
from specert.served.client import ServedError, ServedModel
from specert.served.engine import (
    DraftModelConfig,
    NgramConfig,
    SpecCounts,
    crosscheck,
    read_spec_counts,
    replay,
)
from tiny import tiny_model


def brute_force_draft(c, min_n, max_n, k, max_model_len=None):
    """Every earlier window c[s:s+v] (s + v <= T - 1) equal to the suffix of length v, min_n <= v <= max_n: the
    longest v, then the smallest s; the k tokens after it, cut at the context's end."""
    T = len(c)
    if max_model_len is not None:
        k = min(k, max_model_len - T)
    if T < min_n or k <= 0:
        return []
    found = [(v, s) for v in range(min_n, max_n + 1) for s in range(0, T - v) if c[s : s + v] == c[T - v :]]
    if not found:
        return []
    v, s = min(found, key=lambda vs: (-vs[0], vs[1]))
    return list(c[s + v : s + v + k])


class TestNgramProposer:
    @pytest.mark.parametrize("context, min_n, max_n, k, want", [
        ([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3, 2, [9, 1]),  # the earliest of two occurrences
        ([1, 2, 9, 7, 1, 2, 3, 0, 7, 1, 2], 2, 2, 3, [9, 7, 1]),  # (1, 2): earliest occurrence, at 0
        ([1, 2, 9, 7, 1, 2, 3, 0, 7, 1, 2], 2, 3, 3, [3, 0, 7]),  # (7, 1, 2) is longer: it wins
        ([1, 2, 9, 7, 1, 2, 3, 0, 7, 1, 2], 4, 5, 3, []),  # nothing of 4 tokens or more
        ([4, 8, 15, 16], 1, 3, 2, []),  # no earlier occurrence at all
        ([3, 4, 3], 2, 2, 4, []),  # only a 1-token match, below min_n
        ([3, 4, 3], 1, 2, 4, [4, 3]),  # the draft is cut at the context's end
        ([5, 5, 5], 1, 2, 4, [5]),  # c[0:2] overlaps the suffix c[1:3]; one token follows it
        ([5, 5, 5, 5, 5, 5], 1, 3, 4, [5, 5, 5]),  # periodic: c[0:3], then c[3:6]
        ([7], 1, 1, 4, []),  # one token: no earlier window
        ([], 1, 1, 4, []),
        ([1, 2], 3, 4, 4, []),  # shorter than min_n
    ])
    def test_hand_cases(self, context, min_n, max_n, k, want):
        assert vllm_ngram_draft(context, min_n, max_n, k) == want
        assert brute_force_draft(context, min_n, max_n, k) == want

    def test_max_model_len_caps_the_draft(self):
        context = [1, 2, 3, 4, 1, 2]
        assert vllm_ngram_draft(context, 1, 2, 4) == [3, 4, 1, 2]
        assert vllm_ngram_draft(context, 1, 2, 4, max_model_len=8) == [3, 4]
        assert vllm_ngram_draft(context, 1, 2, 4, max_model_len=6) == []
        assert vllm_ngram_draft(context, 1, 2, 4, max_model_len=5) == []

    def test_match(self):
        assert ngram_match([1, 2, 3, 9, 1, 2, 3], 3) == (3, 3)
        assert ngram_match([1, 2, 3, 9, 1, 2, 3], 2) == (2, 3)  # (2, 3) at 1
        assert ngram_match([1, 2, 3], 3) == (0, 3)

    @pytest.mark.parametrize("min_n, max_n, k", [(0, 2, 1), (3, 2, 1), (1, 1, 0)])
    def test_bad_parameters(self, min_n, max_n, k):
        with pytest.raises(ValueError, match="prompt_lookup|num_speculative_tokens"):
            vllm_ngram_draft([1, 2, 1], min_n, max_n, k)

    def test_seeded_random_against_brute_force(self):
        rng = np.random.default_rng(20261202)
        for _ in range(3000):
            vocab, length = int(rng.integers(2, 8)), int(rng.integers(0, 40))
            c = rng.integers(0, vocab, length).tolist()
            min_n = int(rng.integers(1, 5))
            max_n = min_n + int(rng.integers(0, 4))
            k = int(rng.integers(1, 7))
            cap = int(rng.integers(length, length + 6)) if rng.random() < 0.2 else None
            assert vllm_ngram_draft(c, min_n, max_n, k, cap) == brute_force_draft(c, min_n, max_n, k, cap), \
                (c, min_n, max_n, k, cap)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 3), max_size=30), st.integers(1, 4), st.integers(0, 3), st.integers(1, 6))
    def test_property_against_brute_force(self, c, min_n, extra, k):
        assert vllm_ngram_draft(c, min_n, min_n + extra, k) == brute_force_draft(c, min_n, min_n + extra, k)


class TestDrafter:
    def test_spec(self):
        for spec in ("vllm-ngram", "vllm-ngram:2,4", "vllm-ngram:3,3"):
            check_drafter_spec(spec)
        for spec, message in [("vllm-ngram:4,2", "prompt_lookup_min <= prompt_lookup_max"),
                              ("vllm-ngram:0,2", "1 <= prompt_lookup_min"), ("vllm-ngram:3", "MIN,MAX"),
                              ("vllm-ngram:a,b", "MIN,MAX")]:
            with pytest.raises(ValueError, match=message):
                check_drafter_spec(spec)
        target = tiny_model(seed=1)
        drafter = drafter_from_spec("vllm-ngram:2,4", target)
        assert (drafter.min_n, drafter.max_n, drafter.spec) == (2, 4, "vllm-ngram:2,4")
        assert (drafter_from_spec("vllm-ngram", target).min_n, drafter_from_spec("vllm-ngram", target).max_n) == (5, 5)

    def test_proposes_vllms_draft_as_a_chain(self):
        context = [1, 2, 9, 7, 1, 2, 3, 0, 7, 1, 2]
        drafter = VllmNgramDrafter(2, 3)
        tree = drafter.propose(context, make_schedule(k=2))
        assert tree.tokens == [3, 0] and tree.parents == [-1, 0] and tree.logits is None
        assert drafter.propose(context, make_schedule(k=8)).tokens == vllm_ngram_draft(context, 2, 3, 8)
        assert drafter.propose([1, 2, 3], make_schedule(k=4)).tokens == []
        assert drafter.propose(context, make_schedule(k="auto")).tokens[:1] in ([], [3])

    def test_strict_greedy_decoding_is_the_targets(self):
        target = tiny_model(seed=1)
        prompt = [7] * 6
        base = generate(target, prompt, max_new_tokens=60).tokens
        for shape in (dict(k=4), dict(k="auto")):
            out = generate(target, prompt, VllmNgramDrafter(1, 3), max_new_tokens=60, **shape)
            assert out.tokens == base, shape
            assert shape["k"] == "auto" or sum(out.accepted) > 0  # a chain of 4 has some drafts right


METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2"} 0.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="smollm2"} 14.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="smollm2"} 6.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="smollm2"} 1.7962364081467314e+09
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="smollm2"} 56.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="smollm2"} 24.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="smollm2"} 19.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="smollm2"} 5.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="smollm2",position="0"} 9.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="smollm2",position="1"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="smollm2",position="2"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="smollm2",position="3"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="smollm2",position="0"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="smollm2",position="1"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="smollm2",position="2"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="smollm2",position="3"} 0.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_created Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_created gauge
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="smollm2",position="0"} 1.79e+09
"""


class TestCounters:
    def test_prometheus_text(self):
        counts = read_spec_counts(METRICS)
        assert counts == SpecCounts(20, 80, 24, [12, 5, 5, 2])  # summed over the two engines; _created ignored
        assert counts.mean_acceptance_length == pytest.approx(1 + 24 / 20)
        assert counts.acceptance_rate == pytest.approx(24 / 80)
        assert counts.acceptance_rate_per_position == pytest.approx([12 / 20, 5 / 20, 5 / 20, 2 / 20])

    def test_two_servers_and_none(self):
        assert read_spec_counts(METRICS + "\n" + METRICS) == SpecCounts(40, 160, 48, [24, 10, 10, 4])
        plain = METRICS.split("# HELP vllm:spec_decode")[0]
        assert read_spec_counts(plain) is None

    def test_difference_and_sum(self):
        before, after = SpecCounts(2, 8, 3, [2, 1]), SpecCounts(5, 20, 7, [4, 2, 1, 0])
        assert after - before == SpecCounts(3, 12, 4, [2, 1, 1, 0])
        assert before + before == SpecCounts(4, 16, 6, [4, 2])
        assert SpecCounts(1, 4, 2, [1, 1]).same_as(SpecCounts(1, 4, 2, [1, 1, 0, 0]))
        assert not SpecCounts(1, 4, 2, [1, 1]).same_as(SpecCounts(1, 4, 2, [2, 0]))
        empty = SpecCounts()
        assert np.isnan(empty.mean_acceptance_length) and empty.acceptance_rate_per_position == []


class TestReplay:
    def test_prefill_drafts_nothing_and_empty_drafts_are_not_drafts(self):
        text = [10, 11, 12, 13, 14, 15]
        asked = []
        counts = replay(text, 6, lambda n: asked.append(n) or [])
        assert asked == [1, 2, 3, 4, 5] and counts == SpecCounts()

    def test_accepted_is_the_common_prefix(self):
        text = [10, 11, 12, 13, 14, 15, 16, 17]
        drafts = {1: [11, 12, 99, 14], 4: [14, 15, 16, 17]}  # at 1: 2 accepted, 4 tokens emitted (to n = 4)
        counts = replay(text, 8, lambda n: drafts.get(n, []))
        assert counts == SpecCounts(2, 8, 6, [2, 2, 1, 1])
        assert counts.mean_acceptance_length == 4.0

    def test_acceptances_past_max_tokens_count(self):
        """vLLM does not cut drafts at max_tokens: with max_tokens 3, one draft of 4 accepted in full counts 4."""
        text = [10, 11, 12, 13, 14, 15]
        counts = replay(text, 3, lambda n: text[n : n + 4])
        assert counts == SpecCounts(1, 4, 4, [1, 1, 1, 1])

    def test_eos_ends_the_request_but_not_the_draft(self):
        text = [10, 11, 2, 13, 14, 15, 16]
        counts = replay(text, 7, lambda n: text[n : n + 3], eos={2})
        assert counts == SpecCounts(1, 3, 3, [1, 1, 1])  # one step at n = 1; EOS at index 2 ends the request
        assert replay(text, 7, lambda n: text[n : n + 3]).num_drafts == 2  # ignore_eos: n = 1, then n = 5

    def test_the_text_must_run_past_the_output(self):
        text = [10, 11, 12, 13]
        with pytest.raises(ValueError, match="past max_tokens"):
            replay(text, 4, lambda n: [11, 12, 13, 14] if n == 1 else [])
        with pytest.raises(ValueError, match="generates 5"):
            replay(text, 5, lambda n: [])
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            replay(text, 0, lambda n: [])

    def test_ngram_and_draft_model_proposers(self):
        prompt, text = [1, 2, 3, 4], [1, 2, 3, 5, 1, 2, 3, 4, 1, 2]
        ngram = NgramConfig(3, 2, 3).drafts(prompt, text)
        assert ngram(1) == vllm_ngram_draft([1, 2, 3, 4, 1], 2, 3, 3) == []
        assert ngram(2) == [3, 4, 1]
        assert json.loads(NgramConfig(3, 2, 3).speculative_config()) == {
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
        # a draft model that always predicts "last token + 1": after prompt + text[:n], text[n - 1] + 1
        config = DraftModelConfig("draft", 3, greedy=lambda tokens: [t + 1 for t in tokens])
        propose = config.drafts(prompt, text)
        assert propose(1) == [2, 3, 4] and propose(2) == [3, 4, 6]  # its greedy tokens along the text
        counts = replay(text, 7, propose)
        # n=1: [2, 3, 4] against [2, 3, 5]: 2 accepted; n=4: [6, 2, 3] against [1, 2, 3]: none; n=5: [2, 3, 4],
        # all 3 accepted, to n=9
        assert counts == SpecCounts(3, 9, 5, [2, 2, 1])
        with pytest.raises(ValueError, match="k - 1 tokens past max_tokens"):
            config.drafts(prompt, text[:5])(3)


def _target_next(context):
    """A toy greedy target: repetitive enough for n-gram drafts to be accepted now and then."""
    return (context[-1] * 3 + (context[-2] if len(context) > 1 else 0) + len(context) // 7) % 5


class SimulatedEngine(httpx.BaseTransport):
    """vLLM's greedy speculative decoding, step by step, behind an OpenAI-style HTTP API: the reference the replay
    is checked against. Every step verifies the draft with the target itself (emitting its greedy token at each
    drafted position up to the first mismatch, plus the bonus token), counts the draft, then cuts the output at
    max_tokens or EOS; a draft is proposed after each step."""

    def __init__(self, config: NgramConfig, eos: int | None = None, max_model_len: int = 64):
        self.config, self.eos, self.max_model_len = config, eos, max_model_len
        self.counts = SpecCounts(accepted_per_position=[0] * config.num_speculative_tokens)

    def _run(self, prompt, max_tokens, ignore_eos):
        out = [_target_next(prompt)]  # the prefill
        c = self.config
        while len(out) < max_tokens and (ignore_eos or out[-1] != self.eos):
            draft = brute_force_draft(prompt + out, c.prompt_lookup_min, c.prompt_lookup_max,
                                      c.num_speculative_tokens, self.max_model_len)
            emitted = []
            for token in draft:
                emitted.append(_target_next(prompt + out + emitted))
                if emitted[-1] != token:
                    break
            else:
                emitted.append(_target_next(prompt + out + emitted))
            if draft:
                self.counts.observe_draft(len(draft), len(emitted) - 1)
            for token in emitted:  # the output ends at max_tokens or EOS, whatever the step emitted
                if len(out) < max_tokens and (ignore_eos or out[-1] != self.eos):
                    out.append(token)
        return out

    def handle_request(self, request):
        path = request.url.path
        if path == "/v1/models":
            body = {"data": [{"id": "toy", "max_model_len": self.max_model_len}]}
        elif path == "/metrics":
            return httpx.Response(200, text="\n".join(
                [f"vllm:spec_decode_num_drafts_total{{engine=\"0\"}} {self.counts.num_drafts}",
                 f"vllm:spec_decode_num_draft_tokens_total{{engine=\"0\"}} {self.counts.num_draft_tokens}",
                 f"vllm:spec_decode_num_accepted_tokens_total{{engine=\"0\"}} {self.counts.num_accepted_tokens}"]
                + [f"vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine=\"0\",position=\"{i}\"}} {a}"
                   for i, a in enumerate(self.counts.accepted_per_position)]) + "\n")
        else:
            ask = json.loads(request.content)
            out = self._run(list(ask["prompt"]), ask["max_tokens"], ask["ignore_eos"])
            body = {"choices": [{"token_ids": out, "finish_reason": "length"}]}
        return httpx.Response(200, json=body)


class TestCrosscheck:
    PROMPTS = [[1, 2, 3, 1, 2], [4, 4, 0, 1], [2, 3, 2, 3, 2, 3, 1], [0]]

    @pytest.mark.parametrize("k, lookup, max_tokens", [(4, (1, 3), 24), (2, (2, 2), 17), (5, (1, 1), 40)])
    def test_replay_agrees_with_a_simulated_engine(self, k, lookup, max_tokens):
        config = NgramConfig(k, *lookup)
        engine = SimulatedEngine(config)
        server = ServedModel("http://toy:1/v1", transport=engine)
        engine.counts = SpecCounts(3, 9, 2, [2] + [0] * (k - 1))  # earlier requests: only the increase counts
        result = crosscheck(server, self.PROMPTS, max_tokens, config)
        assert result.engine.num_drafts > 0 and result.engine.num_accepted_tokens > 0
        assert result.replay == result.engine
        assert [len(o) for o in result.outputs] == [max_tokens] * len(self.PROMPTS)

    def test_eos(self):
        config = NgramConfig(3, 1, 2)
        stops = SimulatedEngine(config, eos=4)
        result = crosscheck(ServedModel("http://toy:1/v1", transport=stops), self.PROMPTS, 30, config, eos={4})
        assert result.replay == result.engine
        assert any(len(o) < 30 for o in result.outputs)
        wrong = ServedModel("http://toy:1/v1", transport=SimulatedEngine(config, eos=4))
        with pytest.raises(ServedError, match="give the server's EOS ids"):
            crosscheck(wrong, self.PROMPTS, 30, config, eos={3})

    def test_a_server_that_does_not_speculate(self):
        def plain(request):
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": "toy", "max_model_len": 64}]})
            return httpx.Response(200, text="vllm:num_requests_running 0.0\n")

        server = ServedModel("http://toy:1/v1", transport=httpx.MockTransport(plain))
        with pytest.raises(ServedError, match="--speculative-config"):
            crosscheck(server, self.PROMPTS, 8, NgramConfig(4, 2, 4))
