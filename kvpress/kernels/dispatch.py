"""Public kernel entry points: pick the Triton kernel for CUDA inputs and the torch twin otherwise.

The environment variable KVPRESS_KERNELS=triton|reference forces one backend (read at every call; Triton on
CPU needs TRITON_INTERPRET=1 set before triton is imported).
"""
import os
from typing import Any

import torch

from kvpress.kernels.decode import decode_attention_reference, decode_attention_triton
from kvpress.kernels.extend import extend_attention_reference, extend_attention_triton
from kvpress.kernels.mass import add_score_mass_reference, add_score_mass_triton
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.multi import (
    decode_attention_multi_reference,
    decode_attention_multi_triton,
    store_attention_multi_reference,
    store_attention_multi_triton,
)
from kvpress.kernels.scores import attention_scores_reference, attention_scores_triton
from kvpress.kernels.triton_compat import HAS_TRITON

BACKEND_ENV = "KVPRESS_KERNELS"


def kernel_backend(device: torch.device) -> str:
    """Return "triton" or "reference" for inputs on `device`, honouring KVPRESS_KERNELS when set."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{BACKEND_ENV}=triton but triton is not installed; unset it or install triton")
        return "triton"
    if forced not in ("", "auto"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton', 'reference' or unset; got {forced!r}")
    return "triton" if HAS_TRITON and device.type == "cuda" else "reference"


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row/head over the store: q (B, Hq, D) -> out (B, Hq, D), natural-log lse (B, Hq), float32."""
    impl = decode_attention_triton if kernel_backend(q.device) == "triton" else decode_attention_reference
    return impl(q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
                sm_scale, k_bits, v_bits, k_group, v_group)  # fmt: skip


def decode_attention_multi(
    q: torch.Tensor,
    stores: tuple[tuple, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row/head over 1..4 stores at once (one split-K launch + one combine on Triton): q (B, Hq, D)
    -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq) float32, exactly merged over the stores.

    Each store is (k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, k_bits, v_bits, k_group,
    v_group) as decode_attention takes them, except that kv_start / kv_end may be ints (same for every row) and
    starts are clamped into [0, kv_end] (see kvpress.kernels.multi). With `scores` (float32 (B, Hq, L)), also
    writes every attended token's log2-domain logit at column score_offsets[store] + token, for add_score_mass."""
    impl = decode_attention_multi_triton if kernel_backend(q.device) == "triton" else decode_attention_multi_reference
    return impl(q, stores, sm_scale, out_dtype, scores=scores, score_offsets=score_offsets)


def extend_attention_multi(
    q: torch.Tensor,
    stores: tuple[tuple, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    causal: tuple[bool, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of queries q (B, Hq, Q, D) over 1..5 stores at once (one split-K launch + one combine on Triton),
    exactly merged -> out (B, Hq, Q, D) float32 (or `out_dtype`), natural-log lse (B, Hq, Q) float32. Stores as in
    decode_attention_multi; `causal[s]`: query i sees only tokens j <= i of store s (the chunk itself, stored as
    tokens 0..Q-1)."""
    impl = store_attention_multi_triton if kernel_backend(q.device) == "triton" else store_attention_multi_reference
    return impl(q, stores, sm_scale, out_dtype, causal=causal)


def add_score_mass(
    mass: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None
) -> torch.Tensor:
    """H2O: add this step's attention mass (B, Hkv, L), from the logits decode_attention_multi stored in `scores`
    and the final lse (B, Hq), to `mass` in place for tokens >= kv_start (left padding untouched)."""
    impl = add_score_mass_triton if kernel_backend(mass.device) == "triton" else add_score_mass_reference
    return impl(mass, scores, lse, kv_start)


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q queries per row over all stored tokens, no causal mask: out (B, Hq, Q, D), lse (B, Hq, Q), float32."""
    impl = extend_attention_triton if kernel_backend(q.device) == "triton" else extend_attention_reference
    return impl(q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
                sm_scale, k_bits, v_bits, k_group, v_group)  # fmt: skip


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    k_group: int | None,
) -> torch.Tensor:
    """Attention mass per stored token (B, Hkv, max(kv_end)) float32, summed over GQA heads and queries."""
    impl = attention_scores_triton if kernel_backend(q.device) == "triton" else attention_scores_reference
    return impl(q, k, k_scale, k_zero, block_table, kv_start, kv_end, lse, sm_scale, k_bits, k_group)


def quantize_store(*args: Any, **kwargs: Any) -> Any:
    """Quantize tokens into the store (kvpress.kernels.quantize), Triton for CUDA inputs, torch otherwise."""
    from kvpress.kernels import quantize  # lazy: written separately, imported only when used

    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("quantize_store needs tensor arguments to choose a device")
    if kernel_backend(tensors[0].device) == "triton":
        return quantize.quantize_store_triton(*args, **kwargs)
    return quantize.quantize_store_reference(*args, **kwargs)


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
