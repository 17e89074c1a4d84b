"""KVCodec: how one segment encodes its tokens, so storage and attention never depend on a particular layout.

A codec turns K and V tokens (B, H, N, D) into named fields (docs/STORAGE_LAYOUT.md), back to full precision, and
writes them in place into preallocated (paged) fields. Its layout attributes (`k_bits`, `v_bits`, `k_group`,
`v_group`) are what the attention kernels' tile loads read. New codecs subclass KVCodec and are registered in
kvpress/quant/registry.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class KVCodec(ABC):
    """One encoding of K and V tokens: fields, encode / decode / store, bytes and kernel layout.

    Subclasses set `k_bits`, `v_bits` (16 = unquantized; the kernels read 2, 4, 8 and 16) and `k_group`, `v_group`
    (head-dim elements per (scale, zero) pair; None = one group of head_dim), optionally `k_block` (keys per
    channel), and are compared by value (frozen dataclasses): two equal codecs give every token the same fields.
    """

    k_bits: int
    v_bits: int
    k_group: int | None
    v_group: int | None
    k_block: int | None = None  # keys per channel over blocks of k_block tokens (KIVI); None: per token

    @property
    def token_block(self) -> int:
        """Tokens that must be encoded together (a block of per-channel keys), 1 when each token stands alone:
        segments write this codec's tokens in whole blocks."""
        return self.k_block or 1

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: Any) -> KVCodec:
        """The codec a QuantSpec describes (its bits and group sizes); raises ValueError naming a bad field."""

    @property
    def quantized(self) -> bool:
        """Whether stored K or V are codes rather than the values themselves."""
        return self.k_bits < 16 or self.v_bits < 16

    @property
    @abstractmethod
    def field_names(self) -> tuple[str, ...]:
        """Names of the stored fields, in the order `encode` returns them."""

    @property
    def passthrough(self) -> bool:
        """True when a field holds the values themselves, so writing raw K / V into existing fields (a slice copy
        that casts) stores exactly what `encode` would; False when `store` must encode."""
        return False

    def rotations(self, head_dim: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Rk, Rv): orthogonal (D, D) matrices the stored keys / values were multiplied by (None: stored as they
        come); the attention rotates q by Rk and its output back by Rv (KVStore.k_rotation / v_rotation)."""
        return None, None

    @abstractmethod
    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this codec cannot encode vectors of `head_dim` elements."""

    @abstractmethod
    def group_sizes(self, head_dim: int) -> tuple[int, int]:
        """Effective (K, V) group sizes for `head_dim`: what the kernels' tile loads use (head_dim when unquantized)."""

    @abstractmethod
    def bytes_per_token(self, head_dim: int, input_dtype: torch.dtype = torch.float16) -> int:
        """Bytes one token costs per kv head (K and V, codes and metadata) for inputs of `input_dtype`."""

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fields of tokens k, v (..., D) (usually (B, H, N, D)): a dict keyed by `field_names`."""

    @abstractmethod
    def decode(self, fields: dict[str, torch.Tensor], head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of encoded fields; quantized fields are rebuilt as `dtype`, unquantized ones returned as stored."""

    @abstractmethod
    def store(self, k: torch.Tensor, v: torch.Tensor, fields: dict[str, torch.Tensor], block_table: torch.Tensor,
              dst_start: torch.Tensor) -> None:
        """Encode k, v (B, H, N, D) and write them in place: token n of row b goes to logical index
        t = dst_start[b] + n of the preallocated fields (P, H, S, X), page block_table[b, t // S], slot t % S.
        Inputs are trusted (finite, targets in range): this is the decode hot path."""
