"""The fast torch twins (kernels/reference.py: logits from the codes, one softmax over every store) equal the plain
oracle (kernels/reference_plain.py: each store dequantized, attended alone, merged) to fp32 rounding, for every
encoding the stores take: 16-bit, int8 / int4 keys and values with one group, one group per half, several groups per
half; contiguous and paged; int and per-row bounds; causal chunk stores; the H2O logits output."""
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import make_store

from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.reference_plain import decode_attention_multi_plain, extend_attention_multi_plain
from kvpress.kernels.store import chunk_store

HEAD_DIM, KV_HEADS, GROUP = 32, 2, 3
STARTS, ENDS = [0, 3, 0], [21, 40, 0]  # row 2 attends nothing in this store


def _stores(k_bits, v_bits, k_group, v_group, page_size, int_bounds=False):
    """sinks (fp16), a quantized middle, a window (fp16)."""
    sink = make_store([0, 1, 0], [4, 4, 2], KV_HEADS, HEAD_DIM, dtype=torch.float16, device="cpu", seed=1)
    middle = make_store(STARTS, ENDS, KV_HEADS, HEAD_DIM, k_bits, v_bits, k_group or HEAD_DIM, v_group or HEAD_DIM,
                        torch.float32, page_size, 2, "cpu")  # fmt: skip
    middle = replace(middle, k_group=k_group, v_group=v_group)
    window = make_store([0, 0, 0], [7, 7, 7], KV_HEADS, HEAD_DIM, dtype=torch.float16, device="cpu", seed=3)
    if int_bounds:
        middle = replace(middle, kv_start=2, kv_end=30)
        window = replace(window, kv_start=0, kv_end=7)
    return sink, middle, window


ENCODINGS = {  # k_bits, v_bits, k_group, v_group
    "fp32": (16, 16, None, None),
    "int8-int4-g16": (8, 4, None, 16),  # one group per half of the 4-bit values (the default layout)
    "int8-int4-gNone": (8, 4, None, None),  # one group over both halves
    "int4-int8-g8": (4, 8, 8, 8),  # several groups per part: dequantized before the matmuls
    "int4-int4-g16": (4, 4, 16, 16),
    "int4-int2-g16": (4, 2, None, 16),  # 2-bit values, split quarters, one group per half
    "int2-int2-g8": (2, 2, 8, 8),  # several groups per half: dequantized before the matmuls
    "int2-int2-gNone": (2, 2, None, None),
}


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("int_bounds", [False, True])
def test_decode_twin_equals_the_plain_oracle(encoding, page_size, int_bounds) -> None:
    stores = _stores(*ENCODINGS[encoding], page_size, int_bounds)
    q = torch.randn(3, KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    offsets, length = (0, 4, 44), 51
    got_scores = torch.full((3, KV_HEADS * GROUP, length), -7.0)
    want_scores = got_scores.clone()
    out, lse = decode_attention_multi_reference(q, stores, 0.3, scores=got_scores, score_offsets=offsets)
    ref_out, ref_lse = decode_attention_multi_plain(q, stores, 0.3, scores=want_scores, score_offsets=offsets)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_scores, want_scores, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_extend_twin_with_a_causal_chunk_equals_the_plain_oracle(encoding, monkeypatch) -> None:
    import kvpress.kernels.reference as reference

    monkeypatch.setattr(reference, "REFERENCE_CHUNK_ELEMENTS", 4096)  # several blocks of query rows
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(3, KV_HEADS * GROUP, 5, HEAD_DIM, generator=gen)
    k, v = torch.randn(2, 3, KV_HEADS, 5, HEAD_DIM, generator=gen)
    chunk = chunk_store(k, v, torch.tensor([0, 2, 4]))
    stores = (*_stores(*ENCODINGS[encoding], 16), chunk)
    out, lse = extend_attention_multi_reference(q, stores, 0.2)
    ref_out, ref_lse = extend_attention_multi_plain(q, stores, 0.2)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_rows_that_attend_nothing_give_zero_and_minus_inf() -> None:
    store = make_store([0, 0], [0, 5], KV_HEADS, HEAD_DIM, 8, 4, HEAD_DIM, 16, device="cpu")
    q = torch.randn(2, KV_HEADS * GROUP, HEAD_DIM)
    out, lse = decode_attention_multi_reference(q, (store,), 0.5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert bool((lse[0] == -torch.inf).all()) and bool(lse[1].isfinite().all())


def _twins_equal_the_oracle(stores, seed: int, chunk_start) -> None:
    """Decode over `stores`, then extend over them + a causal chunk (rows' tokens from chunk_start): the fast twins
    equal the plain oracle."""
    q = torch.randn(3, KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    out, lse = decode_attention_multi_reference(q, stores, 0.3)
    ref_out, ref_lse = decode_attention_multi_plain(q, stores, 0.3)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    queries = torch.randn(3, KV_HEADS * GROUP, 4, HEAD_DIM, generator=torch.Generator().manual_seed(seed + 1))
    k, v = torch.randn(2, 3, KV_HEADS, 4, HEAD_DIM, generator=torch.Generator().manual_seed(seed + 2))
    stores = (*stores, chunk_store(k, v, chunk_start))
    out, lse = extend_attention_multi_reference(queries, stores, 0.3)
    ref_out, ref_lse = extend_attention_multi_plain(queries, stores, 0.3)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 2048, 1 << 16])  # one token / 16 tokens of one pair / every pair at once
@pytest.mark.parametrize("encoding", ["int8-int4-g16", "int4-int4-g16", "int4-int2-g16", "int2-int2-gNone"])
def test_decode_twin_in_cache_sized_chunks_equals_the_plain_oracle(encoding, chunk_bytes, monkeypatch) -> None:
    """Codes converted chunk by chunk of (row, kv head) pairs and tokens into the reused scratch give the same
    result, for keys (logits written per chunk) and values (sums accumulated over token chunks)."""
    import kvpress.kernels.reference as reference

    monkeypatch.setattr(reference, "CACHE_CHUNK_BYTES", chunk_bytes)
    _twins_equal_the_oracle(_stores(*ENCODINGS[encoding], None), 6, torch.tensor([0, 1, 3]))


@pytest.mark.parametrize("encoding", ["int8-int4-g16", "int2-int2-gNone", "fp32"])
def test_plain_16bit_stores_read_as_one_equal_the_plain_oracle(encoding) -> None:
    """The fp sinks and window with int bounds (what a cache hands the twin at decode) are joined into one store
    around the quantized middle: decode and extend still equal the oracle, which attends each store alone (the
    causal chunk is never joined)."""
    import kvpress.kernels.reference as reference

    sink, middle, window = _stores(*ENCODINGS[encoding], None, int_bounds=True)
    stores = (replace(sink, kv_start=0, kv_end=4), middle, window)
    assert len(reference._join_plain_stores(stores, 3)) == (1 if encoding == "fp32" else 2)
    _twins_equal_the_oracle(stores, 11, None)
