"""Keys quantized per channel over blocks of G tokens (KIVI, KVStore.k_block): the quantize-and-store kernel writes
the torch twin's bytes (codes, and scales / zeros in slot layout), and the multi-store attention kernel (interpreted
on CPU) reads such a store in place for decode and extend, alone or beside 16-bit stores, equal to the torch twin
(kernels/reference.py) and to dense float64 attention over the dequantized keys and values."""
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, Store, make_store, plain_attention

from kvpress.kernels.affine import dequantize, dequantize_channels, quantize, quantize_channels
from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
from kvpress.kernels.quantize import quantize_store_reference, quantize_store_triton
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.store import chunk_store

KV_HEADS, GROUP = 1, 2


def _store_fields(pages: int, heads: int, slots: int, head_dim: int, bits: int, block: int, gen):
    """Random-filled (codes, scale, zero) of a store, so that stray or missing writes show."""
    return (torch.randint(0, 256, (pages, heads, slots, head_dim * bits // 8), dtype=torch.uint8, generator=gen),
            torch.randn(pages, heads, slots, head_dim // block, generator=gen).half(),
            torch.randn(pages, heads, slots, head_dim // block, generator=gen).half())  # fmt: skip


def _assert_same_bytes(ref, tri) -> None:
    for a, b in zip(ref, tri):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(
    "head_dim,bits,block",
    [(64, bits, block) for bits in (8, 4, 2) for block in (16, 32, 64)] + [(128, 8, 64), (128, 4, 64), (128, 2, 64)],
)  # fmt: skip
def test_quantize_store_per_channel_writes_the_twins_bytes(head_dim, bits, block) -> None:
    """Two blocks per row into a contiguous store of four, row 0 at a nonzero block boundary."""
    gen = torch.Generator().manual_seed(head_dim + bits + block)
    batch, heads = 2, 2
    fields = _store_fields(batch, heads, 4 * block, head_dim, bits, block, gen)
    x = (torch.randn(batch, heads, 2 * block, head_dim, generator=gen) * 3
         + torch.randn(1, heads, 1, head_dim, generator=gen) * 8).to(DEVICE)  # fmt: skip
    table = torch.arange(batch, dtype=torch.int32, device=DEVICE)[:, None]
    start = torch.tensor([2 * block, 0], dtype=torch.int32, device=DEVICE)
    ref = [t.to(DEVICE) for t in fields]
    tri = [t.clone() for t in ref]
    quantize_store_reference(x, *ref, table, start, bits, None, token_block=block)
    quantize_store_triton(x, *tri, table, start, bits, None, token_block=block)
    _assert_same_bytes(ref, tri)
    codes, scale, zero = quantize_channels(x, bits, block)  # and the twin wrote quantize_channels' fields there
    assert torch.equal(ref[0][0, :, 2 * block :], codes[0]) and torch.equal(ref[1][1, :, : 2 * block], scale[1])
    assert torch.equal(ref[2][0, :, 2 * block :], zero[0])


@pytest.mark.parametrize("head_dim,bits,block", [(64, 4, 32), (96, 2, 8)])
def test_quantize_store_per_channel_through_pages_and_a_padded_head_dim(head_dim, bits, block) -> None:
    """Pages of 16 slots in a shuffled pool (a block of 32 spans two pages), bf16 input, head_dim 96 (quarters of 24
    in tiles of 32)."""
    gen = torch.Generator().manual_seed(7)
    fields = _store_fields(14, 2, 16, head_dim, bits, block, gen)
    table = torch.randperm(14, generator=gen)[:12].view(2, 6).to(DEVICE, torch.int32)
    x = (torch.randn(2, 2, 2 * block, head_dim, generator=gen) * 4).to(DEVICE, torch.bfloat16)
    start = torch.tensor([0, block], dtype=torch.int32, device=DEVICE)
    ref = [t.to(DEVICE) for t in fields]
    tri = [t.clone() for t in ref]
    quantize_store_reference(x, *ref, table, start, bits, None, token_block=block)
    quantize_store_triton(x, *tri, table, start, bits, None, token_block=block)
    _assert_same_bytes(ref, tri)


def test_quantize_store_per_channel_refuses_what_it_cannot_write() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    fields = [t.to(DEVICE) for t in _store_fields(1, 1, 64, 64, 4, 16, gen)]
    with pytest.raises(ValueError, match="whole blocks"):
        quantize_store_triton(torch.randn(1, 1, 24, 64, device=DEVICE), *fields, table, start, 4, None, token_block=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_store_triton(torch.randn(1, 1, 16, 64, device=DEVICE), *fields, table, start + 8, 4, None,
                              token_block=16)  # fmt: skip
    with pytest.raises(ValueError, match="power of two"):
        quantize_store_triton(torch.randn(1, 1, 24, 64, device=DEVICE), *fields, table, start, 4, None, token_block=12)
    odd = [torch.zeros(1, 1, 8, 22, dtype=torch.uint8, device=DEVICE), torch.zeros(1, 1, 8, 45, device=DEVICE).half()]
    with pytest.raises(ValueError, match="multiple of 4"):  # 2-bit codes of head_dim 90 do not split in quarters
        quantize_store_triton(torch.randn(1, 1, 2, 90, device=DEVICE), odd[0], odd[1], odd[1].clone(), table, start,
                              2, None, token_block=2)  # fmt: skip


def channel_store(kv_start, kv_end, head_dim, k_bits, v_bits, block, v_group=None, seed=0) -> Store:
    """A contiguous store of whole blocks: keys per channel over blocks of `block` tokens (with per-channel
    outliers, the case KIVI is for), values per token; dense_k / dense_v are what the kernels must see."""
    gen = torch.Generator().manual_seed(seed)
    batch, capacity = len(kv_end), -(-max(kv_end) // block) * block
    k = torch.randn(batch, KV_HEADS, capacity, head_dim, generator=gen) * 1.5
    k = k + torch.randn(1, KV_HEADS, 1, head_dim, generator=gen) * 4
    v = torch.randn(batch, KV_HEADS, capacity, head_dim, generator=gen)
    k_codes, k_scale, k_zero = quantize_channels(k, k_bits, block)
    v_codes, v_scale, v_zero = quantize(v, v_bits, v_group)
    dense_k = dequantize_channels(k_codes, k_scale, k_zero, k_bits, block, head_dim).double()
    dense_v = dequantize(v_codes, v_scale, v_zero, v_bits, v_group, head_dim).double()
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return Store(
        k=on(k_codes), v=on(v_codes), k_scale=on(k_scale), k_zero=on(k_zero), v_scale=on(v_scale),
        v_zero=on(v_zero), block_table=torch.arange(batch, dtype=torch.int32, device=DEVICE)[:, None],
        kv_start=torch.tensor(kv_start, dtype=torch.int32, device=DEVICE),
        kv_end=torch.tensor(kv_end, dtype=torch.int32, device=DEVICE), k_bits=k_bits, v_bits=v_bits,
        v_group=v_group, k_block=block, dense_k=dense_k, dense_v=dense_v,
    )  # fmt: skip


# (head_dim, k_bits, v_bits, block, v_group): int8 / int4 / int2 keys, int4 / int2 values; blocks shorter and longer
# than a key tile (32 tokens); head_dim 96 (halves of 48 in tiles of 64) with 6 and 3 scale columns per slot
ENCODINGS = [(64, 8, 4, 16, 32), (64, 4, 2, 64, None), (64, 2, 2, 32, 32), (96, 4, 4, 16, 16), (96, 8, 2, 32, 48)]


@pytest.mark.parametrize("head_dim,k_bits,v_bits,block,v_group", ENCODINGS)
def test_decode_over_per_channel_keys(head_dim, k_bits, v_bits, block, v_group) -> None:
    """Alone (left padding: rows start at 3 and 0, end inside a block) equal to dense float64 attention and to the
    twin, with two splits; between a 16-bit sink and window (one launch, three stores) equal to the twin."""
    middle = channel_store([3, 0], [2 * block + 5, block + 3], head_dim, k_bits, v_bits, block, v_group, seed=k_bits)
    q = torch.randn(2, KV_HEADS * GROUP, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, lse = decode_attention_multi_triton(q, (middle,), 0.1, num_splits=(2,))
    want, want_lse = plain_attention(q[:, :, None], middle, 0.1)
    torch.testing.assert_close(out.cpu().double(), want[:, :, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse[:, :, 0], atol=1e-4, rtol=1e-4)
    twin, twin_lse = decode_attention_multi_reference(q, (middle,), 0.1)
    torch.testing.assert_close(out, twin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, twin_lse, atol=1e-4, rtol=1e-4)

    sink = make_store([0, 1], [4, 4], KV_HEADS, head_dim, dtype=torch.float16, seed=5)
    window = make_store([0, 0], [6, 6], KV_HEADS, head_dim, dtype=torch.float16, seed=6)
    stores = (sink, middle, window)
    out, lse = decode_attention_multi_triton(q, stores, 0.1)
    twin, twin_lse = decode_attention_multi_reference(q, stores, 0.1)
    torch.testing.assert_close(out, twin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, twin_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim,k_bits,v_bits,block,v_group", [ENCODINGS[0], ENCODINGS[2], ENCODINGS[4]])
def test_extend_over_per_channel_keys_and_a_causal_chunk(head_dim, k_bits, v_bits, block, v_group) -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, KV_HEADS * GROUP, 5, head_dim, generator=gen).to(DEVICE)
    k, v = (t.to(DEVICE) for t in torch.randn(2, 2, KV_HEADS, 5, head_dim, generator=gen))
    middle = channel_store([5, 0], [block + 7, 2 * block], head_dim, k_bits, v_bits, block, v_group, seed=9)
    sink = make_store([0, 0], [4, 4], KV_HEADS, head_dim, dtype=torch.float16, seed=2)
    stores = (sink, middle, chunk_store(k, v, torch.tensor([0, 2], device=DEVICE)))
    out, lse = extend_attention_multi_triton(q, stores, 0.1)
    twin, twin_lse = extend_attention_multi_reference(q, stores, 0.1)
    torch.testing.assert_close(out, twin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, twin_lse, atol=1e-4, rtol=1e-4)
    alone, alone_lse = extend_attention_multi_triton(q, (middle,), 0.1)
    want, want_lse = plain_attention(q, middle, 0.1)
    torch.testing.assert_close(alone.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone_lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-4)


def test_half_precision_queries_over_per_channel_keys() -> None:
    """fp16 q: codes and scales dequantized in fp16 (the GPU fast path)."""
    middle = channel_store([2, 0], [40, 33], 64, 4, 2, 32, 32, seed=4)
    q = torch.randn(2, KV_HEADS * GROUP, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    want, _ = decode_attention_multi_reference(q, (middle,), 0.1)
    out, _ = decode_attention_multi_triton(q.half(), (middle,), 0.1, out_dtype=torch.float16)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_per_channel_keys_in_a_paged_store_are_refused() -> None:
    middle = channel_store([0, 0], [32, 32], 64, 8, 4, 16, seed=1)
    paged = replace(middle, block_table=torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention_multi_triton(torch.randn(2, KV_HEADS * GROUP, 64, device=DEVICE), (paged,), 0.1)
