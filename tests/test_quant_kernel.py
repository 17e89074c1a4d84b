"""Quantize-and-store tests: the Triton kernel equals the torch twin bit for bit, and the twin places
exactly codec.quantize's bytes at the documented (page, slot) of each token."""
import pytest
import torch

from kvpress.kernels.quantize import quantize_store_reference, quantize_store_triton
from kvpress.quant import quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_store(layout: str, batch: int, heads: int, width: int, groups: int, seed: int):
    """Random-filled store tensors plus a block table: 'paged' (S=16, shuffled pool) or 'contiguous'."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "paged":
        page_size, pages_per_row = 16, 3
        n_pages = batch * pages_per_row + 2  # spare pages must stay untouched
        table = torch.randperm(n_pages, generator=gen)[: batch * pages_per_row].view(batch, pages_per_row)
    else:
        page_size, n_pages = 48, batch
        table = torch.arange(batch).view(batch, 1)
    q = torch.randint(0, 256, (n_pages, heads, page_size, width), dtype=torch.uint8, generator=gen)
    scale = torch.randn(n_pages, heads, page_size, groups, generator=gen).half()
    zero = torch.randn(n_pages, heads, page_size, groups, generator=gen).half()
    tensors = (q, scale, zero, table.int())
    return tuple(t.to(DEVICE) for t in tensors)


def _read_back(store: torch.Tensor, table: torch.Tensor, row: int, start: int, count: int) -> torch.Tensor:
    """Gather logical tokens [start, start+count) of one row: (H, count, X)."""
    page_size = store.shape[2]
    t = torch.arange(start, start + count, device=store.device)
    return store[table[row].long()[t // page_size], :, t % page_size].transpose(0, 1)


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_equals_twin_and_codec(head_dim, bits, group, layout):
    batch, heads, n_tokens = 3, 2, 5
    width = head_dim * bits // 8
    groups = head_dim // (group or head_dim)
    store = _make_store(layout, batch, heads, width, groups, seed=head_dim + bits)
    q0, s0, z0, table = store
    x = torch.randn(batch, heads, n_tokens, head_dim, generator=torch.Generator().manual_seed(bits)).to(DEVICE) * 3
    dst_start = torch.tensor([0, 13, 41], dtype=torch.int32, device=DEVICE)  # ragged, crosses page edges
    ref = [t.clone() for t in (q0, s0, z0)]
    tri = [t.clone() for t in (q0, s0, z0)]
    quantize_store_reference(x, *ref, table, dst_start, bits, group)
    quantize_store_triton(x, *tri, table, dst_start, bits, group)
    for a, b in zip(ref, tri):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    codes, scale, zero = quantize(x, bits, group)
    written = torch.zeros(q0.shape[:3], dtype=torch.bool, device=DEVICE)
    for row in range(batch):
        start = int(dst_start[row])
        assert torch.equal(_read_back(ref[0], table, row, start, n_tokens), codes[row])
        assert torch.equal(_read_back(ref[1], table, row, start, n_tokens), scale[row])
        assert torch.equal(_read_back(ref[2], table, row, start, n_tokens), zero[row])
        t = torch.arange(start, start + n_tokens, device=DEVICE)
        written[table[row].long()[t // q0.shape[2]], :, t % q0.shape[2]] = True
    assert torch.equal(ref[0][~written], q0[~written])  # nothing else was overwritten
    assert torch.equal(ref[1][~written], s0[~written])


@pytest.mark.parametrize("impl", [quantize_store_reference, quantize_store_triton])
def test_decode_step_noncontiguous_bf16_input(impl):
    batch, heads, head_dim = 2, 3, 64
    q0, s0, z0, table = _make_store("paged", batch, heads, head_dim // 2, 2, seed=9)
    x = torch.randn(batch, 1, heads, head_dim, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.bfloat16)
    x = x.transpose(1, 2)  # (B, H, 1, D) view with non-standard strides
    dst_start = torch.tensor([15, 47], dtype=torch.int32, device=DEVICE)
    impl(x, q0, s0, z0, table, dst_start, 4, 32)
    codes, scale, _ = quantize(x.contiguous(), 4, 32)
    for row in range(batch):
        assert torch.equal(_read_back(q0, table, row, int(dst_start[row]), 1), codes[row])
        assert torch.equal(_read_back(s0, table, row, int(dst_start[row]), 1), scale[row])


@pytest.mark.parametrize("impl", [quantize_store_reference, quantize_store_triton])
def test_bad_values_raise(impl):
    q0, s0, z0, table = _make_store("paged", 1, 1, 64, 1, seed=3)
    x = torch.randn(1, 1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="dst_start"):
        impl(x, q0, s0, z0, table, torch.tensor([46], dtype=torch.int32, device=DEVICE), 8, None)
    x[0, 0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        impl(x, q0, s0, z0, table, torch.tensor([0], dtype=torch.int32, device=DEVICE), 8, None)
    bad_table = table.clone()
    bad_table[0, 0] = 99
    with pytest.raises(ValueError, match="page ids"):
        impl(x.nan_to_num(), q0, s0, z0, bad_table, torch.tensor([0], dtype=torch.int32, device=DEVICE), 8, None)


@pytest.mark.parametrize("impl", [quantize_store_reference, quantize_store_triton])
def test_bad_shapes_raise(impl):
    q0, s0, z0, table = _make_store("paged", 1, 1, 32, 1, seed=4)
    x = torch.randn(1, 1, 2, 64, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="q_out must be uint8"):
        impl(x, q0, s0, z0, table, start, 8, None)  # 8-bit needs width 64
    with pytest.raises(ValueError, match="scale_out must be float16"):
        impl(x, q0, s0, z0, table, start, 4, 32)  # group 32 needs 2 groups
    with pytest.raises(ValueError, match="block_table must be int32"):
        impl(x, q0, s0, z0, table.long(), start, 4, None)
    with pytest.raises(ValueError, match="dst_start must be int32"):
        impl(x, q0, s0, z0, table, start.long(), 4, None)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 16])
def test_triton_equals_twin_on_tie_heavy_bf16_data(bits, group):
    """bf16 values have few mantissa bits, so (x - zero) / scale often lands near .5: any non-IEEE step
    (reciprocal multiply, fused multiply-add) in the kernel shows up here as a differing byte."""
    batch, heads, n_tokens, head_dim = 2, 2, 128, 128
    width = head_dim * bits // 8
    groups = head_dim // (group or head_dim)
    q0, s0, z0, table = _make_store("contiguous", batch, heads, width, groups, seed=5)
    q0, s0, z0 = (t.new_zeros(batch, heads, n_tokens, t.shape[3]) for t in (q0, s0, z0))
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(batch, heads, n_tokens, head_dim, generator=gen) * torch.rand(batch, heads, n_tokens, 1, generator=gen) * 8)
    x = x.to(DEVICE, torch.bfloat16)
    start = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    ref = [t.clone() for t in (q0, s0, z0)]
    quantize_store_reference(x, *ref, table, start, bits, group)
    quantize_store_triton(x, q0, s0, z0, table, start, bits, group)
    for a, b in zip(ref, (q0, s0, z0)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
