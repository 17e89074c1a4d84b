"""Chunked-prefill attention over the store: Q new queries per row attend, unmasked, to every stored token.

The caller adds attention over the new chunk itself (fp, causal) and merges the two with
merge_attention_states. Both versions run the shared store-attention code of kvpress.kernels.decode,
whose Triton kernel tiles over (GQA head x query) rows and over keys.
"""
import torch

from kvpress.kernels.decode import store_attention_reference, store_attention_triton


def _check_extend_query(q: torch.Tensor) -> None:
    """Extend takes a chunk of queries per row and head: q must be (B, Hq, Q, D)."""
    if q.dim() != 4:
        raise ValueError(f"extend q must be shaped (B, Hq, Q, D); got {tuple(q.shape)} (use decode_attention for Q=1)")


def extend_attention_reference(
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
    """Torch twin: q (B, Hq, Q, D) over stored tokens [kv_start, kv_end) -> out (B, Hq, Q, D), lse (B, Hq, Q)."""
    _check_extend_query(q)
    return store_attention_reference(
        q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
        sm_scale, k_bits, v_bits, k_group, v_group,
    )  # fmt: skip


def extend_attention_triton(
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
    """Triton: tiles of (GQA head x query) rows against key tiles, dequantized in registers; same outputs."""
    _check_extend_query(q)
    return store_attention_triton(
        q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
        sm_scale, k_bits, v_bits, k_group, v_group,
    )  # fmt: skip
