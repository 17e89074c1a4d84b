"""Tiny randomly initialised decoder configs covering the architectures kvpress must support."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)


def tiny_configs() -> dict:
    """name -> config; sliding windows are smaller than the test prompts so the window really cuts."""
    return {
        "llama": LlamaConfig(**COMMON),
        "mistral": MistralConfig(**COMMON, sliding_window=12),
        "qwen2": Qwen2Config(**COMMON),
        "qwen3": Qwen3Config(**COMMON, head_dim=16),
        "phi3": Phi3Config(**COMMON),
        "gemma3": Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    }


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_configs()[name], attn_implementation="sdpa").eval()


def left_padded_batch(batch: int = 3, length: int = 20, pads=(0, 5, 2), seed: int = 1):
    """Random token ids with left padding: row i has pads[i] padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads[:batch]):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def head_dim_model(head_dim: int, arch: str = "llama", seed: int = 0):
    """A tiny model of `arch` ("llama" or "phi3") with the given head_dim (2 query heads, 1 kv head, 2 layers), for
    the head sizes real families use (64, 80, 96, 128, 256)."""
    kwargs = {**COMMON, "hidden_size": 2 * head_dim, "num_attention_heads": 2, "num_key_value_heads": 1}
    config = (Phi3Config if arch == "phi3" else LlamaConfig)(**kwargs, eos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
