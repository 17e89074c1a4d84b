"""Chunked-prefill attention over one store: Q new queries per row attend, unmasked, to every stored token. Both
versions run the shared store-attention code of kvpress.kernels.decode, whose Triton kernel tiles over (GQA head x
query) rows and over keys. The quantized layer's extend attends all its stores and the chunk itself (`chunk_store`,
causal) in one multi-store call instead (kvpress.kernels.multi, dispatch.extend_attention_multi).
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


def chunk_store(k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None) -> tuple:
    """A prefill chunk's own tokens k, v (B, Hkv, Q, D) as one 16-bit store of the multi-store kernels (one page per
    row, pages = rows; rows' tokens [kv_start, Q), left padding before kv_start, None: none), to be attended with
    causal=True: (k, v, None x 4, block table, kv_start, Q, 16, 16, None, None)."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"chunk k and v must both be (B, Hkv, Q, D); got {tuple(k.shape)}, {tuple(v.shape)}")
    batch, _, length, _ = k.shape
    table = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None]
    start = 0 if kv_start is None else kv_start.to(torch.int32)
    return k, v, None, None, None, None, table, start, length, 16, 16, None, None
