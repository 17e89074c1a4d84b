"""Fused attention kernels over the (quantized, paged) KV store, with torch twins; see dispatch for the choice."""
from kvpress.kernels.dispatch import (
    add_score_mass,
    attention_scores,
    decode_attention,
    decode_attention_multi,
    extend_attention,
    extend_attention_multi,
    kernel_backend,
    merge_attention_states,
    quantize_store,
)

__all__ = [
    "add_score_mass",
    "attention_scores",
    "decode_attention",
    "decode_attention_multi",
    "extend_attention",
    "extend_attention_multi",
    "kernel_backend",
    "merge_attention_states",
    "quantize_store",
]
