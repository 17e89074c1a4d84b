"""FullPrecisionCodec: tokens stored as they come (fp32 optionally narrowed to a 16-bit dtype)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .codec_base import KVCodec


@dataclass(frozen=True)
class FullPrecisionCodec(KVCodec):
    """Fields "k", "v" hold the values; `dtype` is the storage dtype of fp32 inputs (16-bit inputs are kept as they
    are), None keeps every input dtype. Used for unquantized layers and for the fp sinks / window."""

    dtype: torch.dtype | None = None
    k_bits: ClassVar[int] = 16
    v_bits: ClassVar[int] = 16
    k_group: ClassVar[int | None] = None
    v_group: ClassVar[int | None] = None

    @classmethod
    def from_spec(cls, spec: Any) -> FullPrecisionCodec:
        """Full precision has no parameters in a QuantSpec: the default codec."""
        return cls()

    @property
    def field_names(self) -> tuple[str, ...]:
        return ("k", "v")

    @property
    def passthrough(self) -> bool:
        return True

    def check_head_dim(self, head_dim: int) -> None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")

    def group_sizes(self, head_dim: int) -> tuple[int, int]:
        return head_dim, head_dim

    def stored_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype tokens of `input_dtype` are stored in."""
        return self.dtype if (self.dtype is not None and input_dtype == torch.float32) else input_dtype

    def bytes_per_token(self, head_dim: int, input_dtype: torch.dtype = torch.float16) -> int:
        self.check_head_dim(head_dim)
        return 2 * head_dim * self.stored_dtype(input_dtype).itemsize

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.stored_dtype(k.dtype)
        return {"k": k.to(dtype), "v": v.to(dtype)}

    def decode(self, fields: dict[str, torch.Tensor], head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return fields["k"], fields["v"]

    def store(self, k: torch.Tensor, v: torch.Tensor, fields: dict[str, torch.Tensor], block_table: torch.Tensor,
              dst_start: torch.Tensor) -> None:
        n_tokens, page_size = k.shape[2], fields["k"].shape[2]
        logical = dst_start.long().unsqueeze(1) + torch.arange(n_tokens, device=k.device)  # (B, N)
        pages = block_table.long().gather(1, logical // page_size).unsqueeze(1)  # (B, 1, N)
        slots = (logical % page_size).unsqueeze(1)
        heads = torch.arange(k.shape[1], device=k.device).view(1, -1, 1)
        for name, x in (("k", k), ("v", v)):
            fields[name][pages, heads, slots] = x.to(fields[name].dtype)
