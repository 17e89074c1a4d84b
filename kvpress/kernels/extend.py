"""Chunked-prefill attention: Q new queries per row attend, unmasked, to every stored token (extend_attention),
and causally to the chunk's own full-precision tokens (chunk_attention); the caller merges the parts with
merge_attention_states. Both run the shared store-attention code of kvpress.kernels.decode, whose Triton kernel
tiles over (GQA head x query) rows and over keys (the chunk as a 16-bit store of one page per row, CAUSAL).
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


def _chunk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None) -> tuple:
    """The chunk's own tokens k, v (B, Hkv, Q, D) as a 16-bit store (one page per row, pages = rows): arguments
    k .. kv_end of the store kernels, with rows' tokens [kv_start, Q) (left padding before kv_start)."""
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"chunk k and v must be (B, Hkv, Q, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, _, length, _ = k.shape
    table = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None]
    start = torch.zeros(batch, dtype=torch.int32, device=k.device) if kv_start is None else kv_start.to(torch.int32)
    end = torch.full((batch,), length, dtype=torch.int32, device=k.device)
    return k, v, None, None, None, None, table, start, end


def chunk_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin: chunk query i of q (B, Hq, Q, D) attends to the chunk's own tokens j of k, v (B, Hkv, Q, D) with
    kv_start[b] <= j <= i (left padding before kv_start; None: none) -> out (B, Hq, Q, D) float32, lse (B, Hq, Q)
    (rows that see nothing - padding queries - give out 0, lse -inf)."""
    _check_extend_query(q)
    return store_attention_reference(q, *_chunk_store(q, k, v, kv_start), sm_scale, 16, 16, None, None, causal=True)


def chunk_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: the store-attention kernel with CAUSAL over the chunk as a store; same outputs as the twin."""
    _check_extend_query(q)
    return store_attention_triton(q, *_chunk_store(q, k, v, kv_start), sm_scale, 16, 16, None, None, causal=True)
