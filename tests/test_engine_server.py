"""The engine cross-check against real vLLM servers of the embedded model (started as a user would:
tests/vllm_server.py): vLLM's speculative-decoding counters against specert's replay on the server's greedy texts,
with vLLM's n-gram proposer and with a draft model; and specert's n-gram proposer against vLLM's own function."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import SPEC_BENCH
from specert.decoding.forward import forward, new_cache
from specert.decoding.models import load_model
from specert.drafters.vllm_ngram import vllm_ngram_draft
from specert.served.client import ServedModel
from specert.served.engine import DraftModelConfig, NgramConfig, crosscheck
from specert.study.prompts import load_prompts
from vllm_server import embedded_hf_folder, require_vllm, truncated_folder, vllm_python, vllm_server

pytestmark = pytest.mark.vllm

NGRAM = NgramConfig(num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4)
MAX_TOKENS = 48
EOS = {2}  # <|im_end|>, the embedded model's end of turn


@pytest.fixture(scope="module")
def vllm():
    require_vllm()


@pytest.fixture(scope="module")
def hf_folder(vllm):
    return embedded_hf_folder()


def _prompts(server: ServedModel) -> list[list[int]]:
    """Four Spec-Bench prompts (four categories) and a question answered in a few tokens (it reaches EOS)."""
    texts = [p.text for p in load_prompts(str(SPEC_BENCH), 4)] + ["What is the capital of France?"]
    return [server.tokenize([{"role": "user", "content": t}]) for t in texts]


def test_ngram_proposer_is_vllms_own(vllm):
    """specert's proposer gives the draft of vLLM's numba function (ngram_proposer.py:209-295) on seeded random
    contexts, every lookup bound and the max_model_len cap included."""
    rng = np.random.default_rng(7)
    cases = []
    for _ in range(2000):
        vocab, length = int(rng.integers(2, 10)), int(rng.integers(0, 48))
        min_n = int(rng.integers(1, 5))
        cases.append({"context": rng.integers(0, vocab, length).tolist(), "min_n": min_n,
                      "max_n": min_n + int(rng.integers(0, 4)), "k": int(rng.integers(1, 8)),
                      "max_model_len": int(rng.integers(max(length, 1), length + 8))})
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as f\n"
        "cases = json.load(sys.stdin)\n"
        "print(json.dumps([f(np.array(c['context'], dtype=np.int32), c['min_n'], c['max_n'], c['max_model_len'],"
        " c['k']).tolist() for c in cases]))\n")
    done = subprocess.run([str(vllm_python()), "-c", script], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=600, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = [vllm_ngram_draft(c["context"], c["min_n"], c["max_n"], c["k"], c["max_model_len"]) for c in cases]
    assert ours == theirs
    assert sum(bool(d) for d in ours) > 500  # many cases draft something


@pytest.fixture(scope="module")
def ngram_server(hf_folder):
    with vllm_server(hf_folder, ["--speculative-config", NGRAM.speculative_config()]) as url:
        server = ServedModel(url)
        server.check()
        yield server
        server.close()


def test_ngram_counters_are_the_replay(ngram_server):
    """vLLM's counters equal specert's replay of its n-gram proposer, draft for draft; the requests generate
    MAX_TOKENS tokens each (ignore_eos)."""
    prompts = _prompts(ngram_server)
    result = crosscheck(ngram_server, prompts, MAX_TOKENS, NGRAM)
    assert result.engine.num_drafts > 0 and result.engine.num_accepted_tokens > 0
    assert result.engine == result.replay
    assert [len(o) for o in result.outputs] == [MAX_TOKENS] * len(prompts)


def test_ngram_counters_at_eos(ngram_server):
    """With EOS honoured the request ends there, its last draft's acceptances past EOS counted: still equal."""
    prompts = _prompts(ngram_server)
    result = crosscheck(ngram_server, prompts, MAX_TOKENS, NGRAM, eos=EOS)
    assert result.outputs[-1][-1] in EOS and len(result.outputs[-1]) < MAX_TOKENS
    assert result.engine == result.replay


DRAFT_LAYERS = 12
DRAFT_K = 3


@pytest.fixture(scope="module")
def draft_folder(hf_folder):
    return truncated_folder(hf_folder, hf_folder.parent / f"{hf_folder.name}-{DRAFT_LAYERS}l", DRAFT_LAYERS)


@pytest.fixture(scope="module")
def draft_server(hf_folder, draft_folder):
    config = DraftModelConfig(str(draft_folder), DRAFT_K)
    with vllm_server(hf_folder, ["--speculative-config", config.speculative_config()]) as url:
        server = ServedModel(url)
        server.check()
        yield server, config
        server.close()


def _near_ties(model, prompt: list[int], text: list[int], gap: float = 1e-3) -> int:
    """Positions along the text where the model's two best logits lie within ``gap``."""
    with torch.inference_mode():
        logits = forward(model.model, new_cache(model.model), prompt + text[:-1])[len(prompt) - 1 :]  # [T, V]
    top = logits.topk(2, dim=-1).values
    return int(((top[:, 0] - top[:, 1]) < gap).sum())


def test_draft_model_counters_are_the_replay(draft_server, draft_folder):
    """A 12-layer truncation of the target as vLLM's draft model (greedy, k = 3) against specert's replay of its
    teacher-forced greedy tokens, computed in process by transformers: equal wherever the draft model has no
    near-tie along the texts (a near-tie may round either way in two engines and flip one draft token)."""
    server, config = draft_server
    prompts = _prompts(server)
    result = crosscheck(server, prompts, MAX_TOKENS, config)
    assert result.engine.num_drafts > 0
    assert result.engine.num_draft_tokens == DRAFT_K * result.engine.num_drafts  # a draft model drafts k every step
    if result.engine != result.replay:
        draft = load_model(str(draft_folder))
        ties = sum(_near_ties(draft, p, t) for p, t in zip(prompts, result.texts))
        assert ties > 0, (result.engine, result.replay)
