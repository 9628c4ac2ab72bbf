from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request):
    """A tiny random Llama, then Qwen3 (tests/tiny.py), for the tests of a module that decode with it."""
    from tiny import tiny_model

    return tiny_model(request.param, seed=1)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M, loaded once per test run (about 15-25 s)."""
    from specert.decoding.models import load_model

    return load_model("smollm2-135m")


SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a local model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from specert.decoding.models import embedded_gguf_path

    path = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.3, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    """A JSONL file of the chats of tests/tiny_distill.py and one plain text: the distillation tests' data."""
    import json

    from tiny_distill import CHATS

    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CHATS) + "\n" + json.dumps("plain text too") + "\n")
    return path


@pytest.fixture(scope="session")
def trained(tiny_chat_dir, chats, tmp_path_factory):
    """A draft head distilled from the tiny chat model with tiny_distill's small config, once per test run: (its
    config, the work folder holding ``head.safetensors``, the run's report)."""
    from specert.train.training import run_distill
    from tiny_distill import small_config

    work = tmp_path_factory.mktemp("distill")
    cfg = small_config(tiny_chat_dir, chats)
    report = run_distill(cfg, work, work / "head.safetensors", progress=False)
    return cfg, work, report


@pytest.fixture(scope="session")
def vllm_url():
    """A real vLLM server of the embedded model (float32, every token's log-probability allowed) for the whole test
    run; its URL. Without vLLM installed (scripts/install-vllm.sh) the tests that need it are skipped, unless
    SPECERT_REQUIRE_VLLM is set (CI), where they fail."""
    from vllm_server import embedded_hf_folder, require_vllm, vllm_server

    require_vllm()
    with vllm_server(embedded_hf_folder(), ["--served-model-name", "smollm2", "--max-logprobs", "-1"]) as url:
        yield url
