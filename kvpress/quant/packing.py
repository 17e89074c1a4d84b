"""Split-halves int4 packing: byte j holds q[j] (low nibble) and q[j + D/2] (high nibble).

This layout (docs/STORAGE_LAYOUT.md) lets a kernel load D/2 bytes and get two contiguous half-vectors.
"""
from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes `[..., D]` (values 0..15, D even) into `[..., D/2]` bytes.

    Only the low 4 bits of each code are kept; the codec never produces larger values.
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4 expects uint8 codes, got {q.dtype}; cast the codes to torch.uint8 first")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    half = q.shape[-1] // 2
    return (q[..., :half] & 0x0F) | (q[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack `[..., D/2]` split-halves bytes into uint8 codes `[..., D]` (inverse of pack_int4)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 bytes, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dimension")
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)
