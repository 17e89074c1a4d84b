"""Head dims that are no power of two (Phi-3's 96, 80): the Triton kernels pad each half of the head dim in the tile
to a power of two and mask the padding (kernels/shapes.py). The multi-store kernel (interpreted on CPU) equals the
torch twin for decode and extend (with the causal chunk store) over 16-bit, int8-int4, int4 and int2 stores, paged
and contiguous; the quantize-and-store kernel writes the twin's bytes; and the shapes the kernels cannot take are
refused by name, before any launch."""
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
from kvpress.kernels.quantize import quantize_store_reference, quantize_store_triton
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.shapes import check_kernel_shapes, half_tile, kernel_shape_problem
from kvpress.kernels.store import chunk_store

KV_HEADS, GROUP = 1, 2


def _encodings(head_dim: int) -> dict[str, tuple[int, int, int | None, int | None]]:
    """k_bits, v_bits, k_group, v_group per layout: groups that leave padding groups in the tile (96: 3 groups of
    16 per half in a tile of 4; 80: 5 of 8 in 8), one group per half (48 / 40: no power of two), 2-bit groups
    within a quarter (24 / 20)."""
    half = head_dim // 2
    in_half = 16 if head_dim == 96 else 8
    return {
        "16-bit": (16, 16, None, None),
        "int8-int4": (8, 4, None, in_half),
        "int4": (4, 4, half, in_half),
        "int2": (2, 2, 4, half),
    }


def _stores(head_dim, encoding, page_size, seed=0):
    """fp16 sinks, the encoded middle (contiguous or paged), fp16 window; ragged rows (row 1's middle is empty)."""
    k_bits, v_bits, k_group, v_group = _encodings(head_dim)[encoding]
    sink = make_store([0, 1], [4, 4], KV_HEADS, head_dim, dtype=torch.float16, seed=seed)
    middle = make_store([0, 9], [37, 9], KV_HEADS, head_dim, k_bits, v_bits, k_group or head_dim,
                        v_group or head_dim, torch.float32, page_size, seed + 1)  # fmt: skip
    middle = replace(middle, k_group=k_group, v_group=v_group)
    window = make_store([0, 0], [6, 6], KV_HEADS, head_dim, dtype=torch.float16, seed=seed + 2)
    return sink, middle, window


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("encoding", ["16-bit", "int8-int4", "int4", "int2"])
@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_with_a_padded_head_dim_equals_the_twin(head_dim, encoding, page_size) -> None:
    stores = _stores(head_dim, encoding, page_size)
    q = torch.randn(2, KV_HEADS * GROUP, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, lse = decode_attention_multi_reference(q, stores, 0.1)
    tri_out, tri_lse = decode_attention_multi_triton(q, stores, 0.1)
    torch.testing.assert_close(tri_out, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_lse, lse, atol=1e-4, rtol=1e-4)
    alone, _ = decode_attention_multi_triton(q, stores[1:2], 0.1)  # one store, one program per row: no combine
    want, _ = plain_attention(q[:, :, None], stores[1], 0.1)
    torch.testing.assert_close(alone[0].cpu().double(), want[0, :, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("encoding", ["16-bit", "int8-int4", "int4", "int2"])
@pytest.mark.parametrize("head_dim", [80, 96])
def test_extend_over_stores_and_a_causal_chunk_with_a_padded_head_dim(head_dim, encoding) -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, KV_HEADS * GROUP, 5, head_dim, generator=gen).to(DEVICE)
    k, v = (t.to(DEVICE) for t in torch.randn(2, 2, KV_HEADS, 5, head_dim, generator=gen))
    stores = (*_stores(head_dim, encoding, 16, seed=4), chunk_store(k, v, torch.tensor([0, 2], device=DEVICE)))
    out, lse = extend_attention_multi_reference(q, stores, 0.1)
    tri_out, tri_lse = extend_attention_multi_triton(q, stores, 0.1)
    torch.testing.assert_close(tri_out, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_lse, lse, atol=1e-4, rtol=1e-4)


def test_half_precision_queries_with_a_padded_head_dim() -> None:
    stores = _stores(96, "int8-int4", 16)
    q = torch.randn(2, KV_HEADS * GROUP, 96, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out, _ = decode_attention_multi_reference(q, stores, 0.1)
    tri_out, _ = decode_attention_multi_triton(q.half(), stores, 0.1, out_dtype=torch.float16)
    torch.testing.assert_close(tri_out.float(), out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "head_dim,bits,group",
    [(96, 8, None), (96, 8, 16), (96, 4, 16), (96, 4, 48), (96, 2, 8), (96, 2, 48), (80, 4, 8), (80, 2, 4),
     (80, 2, 40), (80, 2, None)],
)  # fmt: skip
def test_quantize_store_with_a_padded_head_dim_writes_the_twins_bytes(head_dim, bits, group) -> None:
    gen = torch.Generator().manual_seed(head_dim + bits)
    batch, heads, n_tokens, page_size, pages = 2, 2, 5, 16, 5
    width, groups = head_dim * bits // 8, head_dim // (group or head_dim)
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32, device=DEVICE)
    fields = (torch.randint(0, 256, (pages, heads, page_size, width), dtype=torch.uint8, generator=gen),
              torch.randn(pages, heads, page_size, groups, generator=gen).half(),
              torch.randn(pages, heads, page_size, groups, generator=gen).half())  # fmt: skip
    x = (torch.randn(batch, heads, n_tokens, head_dim, generator=gen) * 3).to(DEVICE)
    start = torch.tensor([0, 13], dtype=torch.int32, device=DEVICE)  # row 1 crosses a page edge
    ref = [t.to(DEVICE) for t in fields]
    tri = [t.clone() for t in ref]
    quantize_store_reference(x, *ref, table, start, bits, group)
    quantize_store_triton(x, *tri, table, start, bits, group)
    for a, b in zip(ref, tri):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_quantize_store_refuses_a_2bit_group_across_quarters() -> None:
    """head_dim 96: a 2-bit group of 16 divides the half (48) but not the quarter (24) the kernel packs in."""
    x = torch.randn(1, 1, 2, 96, device=DEVICE)
    q, s = torch.zeros(1, 1, 4, 24, dtype=torch.uint8, device=DEVICE), torch.zeros(1, 1, 4, 6, device=DEVICE).half()
    table, start = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="quarter"):
        quantize_store_triton(x, q, s, s.clone(), table, start, 2, 16)


def test_tiles_and_the_shapes_the_kernels_refuse() -> None:
    assert [half_tile(d) for d in (32, 64, 80, 96, 128, 256, 24)] == [16, 32, 64, 64, 64, 128, 16]
    assert kernel_shape_problem(96, [("v", 4, 16), ("k", 8, None), ("k", 16, None)]) is None
    assert kernel_shape_problem(128, [("v", 2, 64), ("k", 2, 16)]) is None
    with pytest.raises(ValueError, match="larger than the 256"):
        check_kernel_shapes(320, [])
    with pytest.raises(ValueError, match="even"):
        check_kernel_shapes(63, [])
    with pytest.raises(ValueError, match="k_group: a group must be head_dim=96.*got 32"):  # 8-bit keys: a group across halves
        check_kernel_shapes(96, [("k", 8, 32)])
    with pytest.raises(ValueError, match="straddles two quarters"):
        check_kernel_shapes(96, [("v", 2, 16)])
    with pytest.raises(ValueError, match="multiple of 4"):
        check_kernel_shapes(90, [("v", 2, None)])


def test_a_store_the_kernel_cannot_take_is_refused_before_launch() -> None:
    store = make_store([0], [5], 1, 96, 8, 16, 32, 96, torch.float32, None, 0)  # 8-bit key groups of 32 at 96
    q = torch.randn(1, 1, 96, device=DEVICE)
    assert decode_attention_multi_reference(q, (store,), 0.1)[0].shape == (1, 1, 96)  # the twin takes any group
    with pytest.raises(ValueError, match="store 0 k_group: .*got 32"):
        decode_attention_multi_triton(q, (store,), 0.1)
    big = make_store([0], [5], 1, 320, seed=1)
    with pytest.raises(ValueError, match="head_dim 320"):
        decode_attention_multi_triton(torch.randn(1, 1, 320, device=DEVICE), (big,), 0.1)
