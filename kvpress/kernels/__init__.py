"""Fused attention kernels over the (quantized, paged) KV store, with torch twins; see dispatch for the choice."""
from kvpress.kernels.dispatch import (
    add_score_mass,
    decode_attention_multi,
    extend_attention_multi,
    kernel_backend,
    merge_attention_states,
    quantize_store,
    use_backend,
)
from kvpress.kernels.store import KVStore, chunk_store

__all__ = [
    "KVStore",
    "add_score_mass",
    "chunk_store",
    "decode_attention_multi",
    "extend_attention_multi",
    "kernel_backend",
    "merge_attention_states",
    "quantize_store",
    "use_backend",
]
