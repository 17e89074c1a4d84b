"""One row per (batch row, kv head): how the multi-store kernels attend stores whose heads hold different lengths.

A store with per-head lengths (paged/ragged.py) has one kv head per row. Every other store of the same layer is seen
the same way without a copy: pages (P, H, S, X) are pages (P * H, 1, S, X), row b's table entry p becomes p * H + h
for row b * H + h, and the queries of kv group h become that row's query heads. The kernels and their twins are
unchanged: per-(row, head) lengths are per-row lengths of this view.
"""
from __future__ import annotations

import dataclasses

import torch

from .store import KVStore

_PAGED_FIELDS = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")


def _pages_as_head_rows(pages: torch.Tensor) -> torch.Tensor:
    """(P, H, S, X) -> (P * H, 1, S, X): a view when the pages are contiguous per head, else a copy."""
    return pages.reshape(pages.shape[0] * pages.shape[1], 1, *pages.shape[2:])


def as_head_rows(store: KVStore) -> KVStore:
    """`store` (B rows, H kv heads) as B * H rows of one kv head each (row b * H + h is head h of row b)."""
    heads = store.k.shape[1]
    if heads == 1:
        return store
    table = store.block_table.to(torch.int32)
    head = torch.arange(heads, device=table.device, dtype=torch.int32)
    rows = (table[:, None, :] * heads + head[None, :, None]).reshape(-1, table.shape[1])
    moved = {name: _pages_as_head_rows(getattr(store, name)) for name in _PAGED_FIELDS
             if getattr(store, name) is not None}
    bounds = {name: getattr(store, name).repeat_interleave(heads) for name in ("kv_start", "kv_end")
              if isinstance(getattr(store, name), torch.Tensor)}
    return dataclasses.replace(store, block_table=rows, **moved, **bounds)


def split_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) queries -> (B * kv_heads, Hq // kv_heads, ...): kv group h of row b becomes row b * kv_heads + h."""
    batch, q_heads = x.shape[:2]
    return x.reshape(batch * kv_heads, q_heads // kv_heads, *x.shape[2:])


def merge_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of split_heads: (B * kv_heads, group, ...) -> (B, Hq, ...)."""
    return x.reshape(batch, -1, *x.shape[2:])
