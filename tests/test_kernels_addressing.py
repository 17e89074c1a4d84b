"""How the Triton kernels address a store's tokens (store_access.store_addressing, tile_loads.token_pages): the rule
the launchers apply, and every specialisation against the torch twins on ragged rows - CONTIGUOUS (a one-column
block table: the contiguous store with a capacity that is no power of two, and paged stores of one page per row whose
table is not the identity: a permuted pool with P == B, a shuffled pool with spare pages, rows sharing a page, an
out-of-range entry of an empty row), power-of-two pages (shift and mask) and other page sizes (division).
Tiles of 32 tokens over several splits cross page boundaries (12-token pages) and row starts at odd tokens.
"""
import math
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store

from kvpress.kernels.multi import decode_attention_multi_triton
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.store_access import store_addressing

KV_HEADS, GROUP, HEAD_DIM = 2, 2, 32
ROWS = ([0, 5, 0, 3], [45, 29, 0, 37])  # row 2 empty (its one-column table entry is out of range); capacity 45


def _store(layout: str, seed: int = 0):
    """An int8-K / int4-V store of ROWS in the given layout (see the module docstring)."""
    page_size = {"contiguous": None, "paged16": 16, "paged12": 12}.get(layout, 48)  # 48: one page per row
    if layout == "one-page-p-equals-b":
        page_size = None
    store = make_store(*ROWS, KV_HEADS, HEAD_DIM, 8, 4, HEAD_DIM, 16, torch.float32, page_size, seed)
    if layout == "one-page-p-equals-b":  # pages permuted: row b lives in page perm[b] of a pool of exactly B pages
        perm = torch.tensor([2, 0, 3, 1])
        inverse = torch.argsort(perm)
        fields = {name: getattr(store, name)[inverse.to(DEVICE)].contiguous()
                  for name in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")}
        store = replace(store, **fields, block_table=perm.to(torch.int32)[:, None].to(DEVICE))
    elif layout == "one-page-shared":  # row 3 reads row 0's page (prefix sharing of a whole one-page row)
        store.block_table[3, 0] = store.block_table[0, 0]
    if layout.startswith("one-page"):
        assert store.block_table.shape[1] == 1 and not torch.equal(
            store.block_table[:, 0].cpu(), torch.arange(len(ROWS[0]), dtype=torch.int32)
        )
    return store


LAYOUTS = ["contiguous", "paged16", "paged12", "one-page-p-equals-b", "one-page-shuffled", "one-page-shared"]


def test_addressing_rule_reads_shapes_only() -> None:
    one_column = torch.full((3, 1), 7, dtype=torch.int32)  # values are never read: any one-column table
    assert store_addressing(one_column, 45) == (True, -1)
    assert store_addressing(one_column, 16) == (True, -1)
    paged = torch.zeros(3, 4, dtype=torch.int64)
    assert store_addressing(paged, 16) == (False, 4)
    assert store_addressing(paged, 1) == (False, 0)
    assert store_addressing(paged, 12) == (False, -1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_equals_reference(layout: str) -> None:
    store = _store(layout, seed=1)
    q = torch.randn(len(ROWS[0]), KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out, lse = decode_attention_multi_triton(q, (store,), 0.3, num_splits=(3,))
    ref_out, ref_lse = decode_attention_multi_reference(q, (store,), 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    assert bool((lse[2] == -math.inf).all())


def test_multi_store_mixes_addressing_modes() -> None:
    """One launch, four slots with four different addressing specialisations."""
    stores = [_store(layout, seed=3 + i) for i, layout in enumerate(["contiguous", "paged12", "paged16"])]
    stores.append(_store("one-page-shared", seed=7))
    q = torch.randn(len(ROWS[0]), KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    args = tuple(stores)
    out, lse = decode_attention_multi_triton(q, args, 0.3, num_splits=(2, 3, 1, 2))
    ref_out, ref_lse = decode_attention_multi_reference(q, args, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "paged12", "one-page-p-equals-b", "one-page-shared"])
def test_logit_output_equals_reference(layout: str) -> None:
    """The fused decode's logits (scores=) are read through the same addressing as the attention."""
    store = _store(layout, seed=11)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(len(ROWS[0]), KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(DEVICE)
    written = []
    for impl in (decode_attention_multi_triton, decode_attention_multi_reference):
        scores = torch.full((len(ROWS[0]), KV_HEADS * GROUP, 50), -1.0, device=DEVICE)
        impl(q, (store,), 0.3, scores=scores, score_offsets=(5,))
        written.append(scores)
    torch.testing.assert_close(written[0], written[1], atol=1e-4, rtol=1e-4)
