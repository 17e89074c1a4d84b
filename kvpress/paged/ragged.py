"""RaggedStore: the tokens one compression kept, with its own length for every (row, kv-head), in small pages.

Per-head budgets (AdaKV, KVzip's global allocation) keep a different number of tokens in each head. A rectangular
(B, H, T) buffer would hold every head at the longest head's length; here each (row, head) is one row of a paged
store with one kv head - pages (P, 1, PAGE_TOKENS, X) addressed by an int32 block table (B * H, max_pages) and
`lengths` (B * H,) - so the bytes held follow the tokens kept (plus under one page per head). The kernels read it like
any paged store, with the queries of one kv group as that row's query heads (kernels/head_rows.py).
Built once from a keep mask and never written afterwards: rows may share pages (beam search repeats rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE_TOKENS = 16  # tokens per page: a power of two (the kernels address it with shifts); waste < 1 page per head


@dataclass(frozen=True, eq=False)
class RaggedStore:
    """Kept tokens of `heads` kv heads per batch row: `fields` (P, 1, PAGE_TOKENS, X) per field name,
    `block_table` (B * heads, max_pages) int32 (row b * heads + h), `lengths` (B * heads,) int32 tokens per row."""

    fields: dict[str, torch.Tensor]
    block_table: torch.Tensor
    lengths: torch.Tensor
    heads: int
    total_tokens: int  # tokens held over every (row, head), known on the host (no sync when attending)

    @classmethod
    def build(cls, fields: dict[str, torch.Tensor], keep: torch.Tensor) -> RaggedStore:
        """Pack the tokens `keep` (B, H, T) bool selects of `fields` (B, H, T, X each), in logical order per head."""
        batch, heads, n_tokens = keep.shape
        rows = keep.reshape(batch * heads, n_tokens)
        lengths = rows.sum(dim=1)
        pages_per_row = (lengths + PAGE_TOKENS - 1) // PAGE_TOKENS
        first_page = torch.cumsum(pages_per_row, dim=0) - pages_per_row
        n_pages = max(1, int(pages_per_row.sum()))
        max_pages = max(1, int(pages_per_row.max()))
        # kept tokens first, in ascending position (stable sort of "not kept")
        order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)
        slot = torch.arange(n_tokens, device=keep.device)
        used = slot[None, :] < lengths[:, None]
        dest = (first_page[:, None] * PAGE_TOKENS + slot[None, :])[used]
        packed = {}
        for name, value in fields.items():
            flat = value.reshape(batch * heads, n_tokens, *value.shape[3:])
            gathered = torch.gather(flat, 1, order.view(*order.shape, *([1] * (flat.dim() - 2))).expand_as(flat))
            pages = value.new_zeros(n_pages * PAGE_TOKENS, *value.shape[3:])
            pages[dest] = gathered[used]
            packed[name] = pages.view(n_pages, 1, PAGE_TOKENS, *value.shape[3:])
        table = first_page[:, None] + torch.arange(max_pages, device=keep.device)[None, :]
        table = torch.minimum(table, torch.tensor(n_pages - 1, device=keep.device))  # unused slots: any valid page
        return cls(packed, table.to(torch.int32), lengths.to(torch.int32), heads, int(lengths.sum()))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0] // self.heads

    def index_batch(self, rows: torch.Tensor) -> RaggedStore:
        """This store with batch rows `rows` (B',) selected / repeated / reordered: tables only, pages shared."""
        heads = torch.arange(self.heads, device=self.lengths.device)
        picked = (rows.to(self.lengths.device)[:, None] * self.heads + heads[None, :]).reshape(-1)
        lengths = self.lengths.index_select(0, picked)
        return RaggedStore(self.fields, self.block_table.index_select(0, picked), lengths, self.heads,
                           int(lengths.sum()))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.fields.values(), self.block_table, self.lengths]
