"""2-bit codes (split quarters, docs/STORAGE_LAYOUT.md) read in place: the packing itself, the multi-store Triton
kernel (interpreted on CPU) equal to the torch twin for decode and extend over int4-int2 / int2-int2 middles, and
both equal to float64 attention over the dequantized tokens."""
import math
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels.affine import dequantize, quantize
from kvpress.kernels.affine_layout import pack_int2, unpack_int2
from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.store import chunk_store


def test_int2_packing_is_split_quarters() -> None:
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 1], codes[0, 2], codes[0, 5], codes[0, 7] = 3, 1, 2, 3  # quarters 0, 1, 2, 3 of width 2
    assert pack_int2(codes).tolist() == [[1 << 2, 3 | (2 << 4) | (3 << 6)]]  # byte j holds elements j + 2i
    assert torch.equal(unpack_int2(pack_int2(codes)), codes)
    many = torch.randint(0, 4, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int2(pack_int2(many)), many)


@pytest.mark.parametrize("group", [None, 32, 16])
def test_int2_round_trip_error_is_at_most_half_a_step(group) -> None:
    x = torch.randn(2, 3, 7, 64) * 2
    codes, scale, zero = quantize(x, 2, group)
    assert codes.shape[-1] == 16 and scale.shape[-1] == 64 // (group or 64)
    err = (dequantize(codes, scale, zero, 2, group, 64) - x).abs()
    assert bool((err <= scale.float().repeat_interleave(group or 64, -1) * 0.5 + 1e-5).all())


HEAD_DIM, KV_HEADS, GROUP = 64, 2, 3
ENCODINGS = {  # k_bits, v_bits, k_group, v_group
    "int4-int2-g32": (4, 2, None, 32),
    "int2-int2-g16": (2, 2, 16, 16),
    "int2-int2-gNone": (2, 2, None, None),
}


def _stores(k_bits, v_bits, k_group, v_group, page_size, seed=0):
    """fp16 sinks, a 2-bit middle (contiguous or paged), fp16 window."""
    sink = make_store([0, 1, 0], [4, 4, 2], KV_HEADS, HEAD_DIM, dtype=torch.float16, seed=seed)
    middle = make_store([0, 3, 5], [21, 40, 5], KV_HEADS, HEAD_DIM, k_bits, v_bits, k_group or HEAD_DIM,
                        v_group or HEAD_DIM, torch.float32, page_size, seed + 1)  # fmt: skip
    middle = replace(middle, k_group=k_group, v_group=v_group)
    window = make_store([0, 0, 0], [7, 7, 7], KV_HEADS, HEAD_DIM, dtype=torch.float16, seed=seed + 2)
    return sink, middle, window


def _plain_over_stores(q4, stores, sm_scale):
    """Float64 attention over the union of every store's dense tokens, rows by rows (q4: (B, Hq, Q, D))."""
    batch, q_heads, _, head_dim = q4.shape
    out = torch.zeros(*q4.shape, dtype=torch.float64)
    lse = torch.full(q4.shape[:3], -math.inf, dtype=torch.float64)
    for b in range(batch):
        spans = [(int(s.kv_start[b]), int(s.kv_end[b])) for s in stores]
        keys = torch.cat([s.dense_k[b, :, lo:hi] for s, (lo, hi) in zip(stores, spans)], 1)
        values = torch.cat([s.dense_v[b, :, lo:hi] for s, (lo, hi) in zip(stores, spans)], 1)
        keys = keys.repeat_interleave(GROUP, 0)
        values = values.repeat_interleave(GROUP, 0)
        scores = q4[b].double().cpu() @ keys.transpose(-1, -2) * sm_scale
        lse[b] = torch.logsumexp(scores, -1)
        out[b] = torch.softmax(scores, -1) @ values
    return out, lse


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_decode_over_int2_stores(encoding, page_size) -> None:
    stores = _stores(*ENCODINGS[encoding], page_size)
    q = torch.randn(3, KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, lse = decode_attention_multi_reference(q, stores, 0.2)
    want_out, want_lse = _plain_over_stores(q[:, :, None], stores, 0.2)
    torch.testing.assert_close(out.cpu().double(), want_out[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want_lse[:, :, 0], atol=1e-5, rtol=1e-5)
    tri_out, tri_lse = decode_attention_multi_triton(q, stores, 0.2)
    torch.testing.assert_close(tri_out, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_lse, lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_extend_over_int2_stores_and_a_causal_chunk(encoding) -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, KV_HEADS * GROUP, 5, HEAD_DIM, generator=gen).to(DEVICE)
    k, v = (t.to(DEVICE) for t in torch.randn(2, 3, KV_HEADS, 5, HEAD_DIM, generator=gen))
    stores = (*_stores(*ENCODINGS[encoding], 16, seed=3), chunk_store(k, v, torch.tensor([0, 2, 4], device=DEVICE)))
    out, lse = extend_attention_multi_reference(q, stores, 0.2)
    tri_out, tri_lse = extend_attention_multi_triton(q, stores, 0.2)
    torch.testing.assert_close(tri_out, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_lse, lse, atol=1e-4, rtol=1e-4)
    middle = stores[1]  # the quantized middle alone equals float64 attention over its dequantized tokens
    alone, alone_lse = extend_attention_multi_reference(q, (middle,), 0.2)
    want, want_lse = plain_attention(q, middle, 0.2)
    torch.testing.assert_close(alone.cpu().double(), want, atol=1e-5, rtol=1e-5)
