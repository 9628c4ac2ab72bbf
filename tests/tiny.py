"""Tiny random causal LMs built from configs (no download), for decoder tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from specert.models import LoadedModel

VOCAB = 257


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 4, vocab: int = VOCAB, eos: int | None = None):
    """A float64 model with peaked next-token distributions (large init), wrapped as a LoadedModel."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    model = model.double().eval()
    model.generation_config.eos_token_id = eos
    return LoadedModel(model, None, f"tiny-{arch}-{seed}")
