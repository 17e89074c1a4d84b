"""AffineCodec: per-group min/max int8 / int4 codes with fp16 scale and zero (docs/STORAGE_LAYOUT.md).

The math lives in kvpress.kernels.affine (shared with the quantize-and-store kernel, which reproduces its bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import quantize_store
from ..kernels.affine import check_token_block, dequantize, dequantize_channels, quantize, quantize_channels
from ..kernels.affine_layout import check_bits, code_width, effective_group_size, group_count
from ..kernels.rotation import hadamard_rotation
from .codec_base import KVCodec


@dataclass(frozen=True)
class AffineCodec(KVCodec):
    """Keys and values quantized per (token, head, group of head_dim elements) to `k_bits` / `v_bits` (2, 4 or 8);
    fields "k", "k_scale", "k_zero", "v", "v_scale", "v_zero". Groups of None span the whole head_dim. With
    `rotate_k` / `rotate_v` the codes are of k @ R / v @ R (randomised Hadamard); decode rotates back, and the stores
    carry R so the attention rotates q and its output (kernels/rotation.py). With `k_block` G, keys are quantized per
    channel over blocks of G tokens (KIVI: keys have outlier channels, so a channel's range is tighter than a
    token's; kernels/affine.quantize_channels), and tokens are encoded and stored in whole blocks."""

    k_bits: int = 8
    v_bits: int = 4
    k_group: int | None = None
    v_group: int | None = 32
    rotate_k: bool = False  # store k @ R (randomised Hadamard, kernels/rotation.py) instead of k
    rotate_v: bool = False
    k_block: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.k_bits, "k_bits")
        check_bits(self.v_bits, "v_bits")
        if self.k_block is not None and self.k_group is not None:
            raise ValueError(f"keys per channel (k_block={self.k_block}) have no head-dim group; got "
                             f"k_group={self.k_group}")

    @classmethod
    def from_spec(cls, spec: Any) -> AffineCodec:
        """QuantSpec fields k_bits, v_bits, k_group_size, group_size, rotate ("none", "k", "v" or "kv"), k_block."""
        rotate = getattr(spec, "rotate", "none")
        return cls(spec.k_bits, spec.v_bits, spec.k_group_size, spec.group_size, "k" in rotate, "v" in rotate,
                   getattr(spec, "k_block", None))

    def rotations(self, head_dim: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        matrix = hadamard_rotation(head_dim, device) if self.rotate_k or self.rotate_v else None
        return (matrix if self.rotate_k else None), (matrix if self.rotate_v else None)

    def _rotated(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as they are stored (rotated in float32 where the codec rotates)."""
        rk, rv = self.rotations(k.shape[-1], k.device)
        return (k if rk is None else k.float() @ rk), (v if rv is None else v.float() @ rv)

    @property
    def field_names(self) -> tuple[str, ...]:
        return ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")

    def _parts(self) -> tuple[tuple[str, int, int | None, int | None], ...]:
        """(field, bits, group, token block) of keys, then values (a block: per channel, values never are)."""
        return ("k", self.k_bits, self.k_group, self.k_block), ("v", self.v_bits, self.v_group, None)

    @staticmethod
    def _stored(fields: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) of field `name`."""
        return fields[name], fields[f"{name}_scale"], fields[f"{name}_zero"]

    def check_head_dim(self, head_dim: int) -> None:
        self.group_sizes(head_dim)
        if self.k_block is not None:
            check_token_block(head_dim, self.k_block)
        if (self.rotate_k or self.rotate_v) and head_dim & (head_dim - 1):
            raise ValueError(f"rotated codes need a power-of-two head_dim (Hadamard); got {head_dim}")

    def group_sizes(self, head_dim: int) -> tuple[int, int]:
        """(K, V) head-dim elements per scale column; per-channel keys: head_dim / columns = k_block."""
        k_group = self.k_block if self.k_block is not None else effective_group_size(head_dim, self.k_bits,
                                                                                      self.k_group)
        return k_group, effective_group_size(head_dim, self.v_bits, self.v_group)

    def bytes_per_token(self, head_dim: int, input_dtype: torch.dtype = torch.float16) -> int:
        """Codes plus an fp16 scale and zero per group, for K and V (independent of the input dtype); per-channel
        keys hold head_dim pairs per block of k_block tokens, head_dim / k_block per token."""
        return sum(code_width(head_dim, bits) + 4 * (head_dim // block if block else group_count(head_dim, bits, group))
                   for _, bits, group, block in self._parts())

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        fields = {}
        for (name, bits, group, block), x in zip(self._parts(), self._rotated(k, v)):
            encoded = quantize_channels(x, bits, block) if block else quantize(x, bits, group)
            fields[name], fields[f"{name}_scale"], fields[f"{name}_zero"] = encoded
        return fields

    def decode(self, fields: dict[str, torch.Tensor], head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = ((dequantize_channels(*self._stored(fields, name), bits, block, head_dim, dtype) if block else
                 dequantize(*self._stored(fields, name), bits, group, head_dim, dtype))
                for name, bits, group, block in self._parts())
        rk, rv = self.rotations(head_dim, k.device)
        k = k if rk is None else (k.float() @ rk.T).to(dtype)
        v = v if rv is None else (v.float() @ rv.T).to(dtype)
        return k, v

    def store(self, k: torch.Tensor, v: torch.Tensor, fields: dict[str, torch.Tensor], block_table: torch.Tensor,
              dst_start: torch.Tensor) -> None:
        """The fused quantize-and-store kernel (Triton on CUDA), K then V: no encoded copy is made first."""
        for (name, bits, group, block), x in zip(self._parts(), self._rotated(k, v)):
            quantize_store(x, *self._stored(fields, name), block_table, dst_start, bits, group, check_values=False,
                           token_block=block)
