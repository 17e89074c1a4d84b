"""Contiguous per-layer token storage: named tensors (B, H, capacity, X) grown geometrically in place.

This is the `P = B`, `S = capacity` case of docs/STORAGE_LAYOUT.md: kernels see it through `block_table()` exactly
like a paged store. Appends write into spare capacity (no per-step concatenation); eviction (`keep`) reallocates to
the exact kept size so that memory is really freed.
"""
from __future__ import annotations

import torch

GROWTH_MIN_TOKENS = 64
# Grow by capacity / 64: at most ~1.6 % spare bytes held, and amortised O(1) copies per token (a decode step reads
# the whole store anyway, so one copy every capacity / 64 tokens costs under a step per 64 steps).
GROWTH_FRACTION = 64


class ContiguousStore:
    """Holds one layer's encoded tokens; every field shares the token axis 2 and the batch/head axes 0/1."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens  # a known upper bound (e.g. an fp window) caps growth: no spare beyond it
        self.fields: dict[str, torch.Tensor] = {}
        self.length = 0
        self._block_table: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return next(iter(self.fields.values())).shape[2] if self.fields else 0

    @property
    def batch_size(self) -> int:
        return next(iter(self.fields.values())).shape[0] if self.fields else 0

    def view(self, name: str) -> torch.Tensor:
        """The stored tokens of one field, a view without copy: (B, H, length, X)."""
        return self.fields[name][:, :, : self.length]

    def append(self, new: dict[str, torch.Tensor]) -> None:
        """Write `new` fields (B, H, N, X) after the stored tokens, growing capacity geometrically if needed."""
        n = next(iter(new.values())).shape[2]
        if not self.fields:
            # Exact-size first allocation: a prompt stored once costs no spare capacity.
            self.fields = {k: v.contiguous().clone() for k, v in new.items()}
            self.length = n
            self._block_table = None
            return
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        for name, value in new.items():
            self.fields[name][:, :, self.length : self.length + n] = value
        self.length += n

    def reserve(self, n: int) -> None:
        """Make room for `n` more tokens (a writer then fills them in place and calls `advance`)."""
        if self.length + n > self.capacity:
            self._grow(self.length + n)

    def advance(self, n: int) -> None:
        """Count `n` tokens written in place after `reserve`."""
        self.length += n

    def _grow(self, needed: int) -> None:
        cap = max(needed, self.capacity + max(GROWTH_MIN_TOKENS, self.capacity // GROWTH_FRACTION))
        if self.max_tokens is not None:
            cap = max(needed, min(cap, self.max_tokens))
        grown = {}
        for name, buf in self.fields.items():
            bigger = buf.new_empty(buf.shape[0], buf.shape[1], cap, *buf.shape[3:])
            bigger[:, :, : self.length] = buf[:, :, : self.length]
            grown[name] = bigger
        self.fields = grown

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only tokens `idx` (B, H, K) per (row, head), in that order; reallocates to exactly K tokens."""
        kept = {}
        for name, buf in self.fields.items():
            view = buf[:, :, : self.length]
            index = idx.to(view.device).view(*idx.shape, *([1] * (view.dim() - 3)))
            kept[name] = torch.gather(view, 2, index.expand(*idx.shape, *view.shape[3:])).contiguous()
        self.fields = kept
        self.length = idx.shape[2]

    def compact(self, idx: torch.Tensor) -> None:
        """Keep tokens `idx` (B, H, K) in place (no reallocation): memory stays flat during decode-time eviction."""
        for name, buf in self.fields.items():
            view = buf[:, :, : self.length]
            index = idx.to(view.device).view(*idx.shape, *([1] * (view.dim() - 3)))
            buf[:, :, : idx.shape[2]] = torch.gather(view, 2, index.expand(*idx.shape, *view.shape[3:]))
        self.length = idx.shape[2]

    def drop_front(self, n: int) -> None:
        """Forget the first `n` stored tokens of every row (sliding windows); keeps the buffer, shifts in place."""
        if n <= 0:
            return
        if n >= self.length:
            self.clear()
            return
        rest = self.length - n
        for name, buf in self.fields.items():
            buf[:, :, :rest] = buf[:, :, n : self.length].clone()
        self.length = rest

    def drop_back(self, n: int) -> None:
        """Forget the last `n` stored tokens (crop for assisted decoding)."""
        self.length = max(0, self.length - n)

    def index_batch(self, rows: torch.Tensor) -> None:
        """Reorder / select / repeat batch rows (beam search, batch expansion)."""
        self.fields = {k: v.index_select(0, rows.to(v.device)) for k, v in self.fields.items()}
        self._block_table = None

    def block_table(self) -> torch.Tensor:
        """int32 (B, 1) table mapping row b to page b, so kernels read this store like a paged one."""
        b = self.batch_size
        if self._block_table is None or self._block_table.shape[0] != b:
            device = next(iter(self.fields.values())).device
            self._block_table = torch.arange(b, device=device, dtype=torch.int32)[:, None]
        return self._block_table

    def nbytes(self) -> int:
        """Bytes held by the store's tensors (allocated capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def tensors(self) -> list[torch.Tensor]:
        return list(self.fields.values())

    def clear(self) -> None:
        self.fields = {}
        self.length = 0
        self._block_table = None
