"""Decode over one store (decode_attention_multi with one store): the torch twin equals plain float64 attention over independently dequantized K/V, and the
Triton kernel (interpreted on CPU) equals the twin, on contiguous and paged, fp and int8-K/int4-V stores.

Tolerances: fp32 queries use exact fp32 dots in both versions, so outputs agree to 1e-4 (abs + rel) - well
inside the 1e-3 budget; fp16/bf16 queries make the kernel's dot operands (and the dequantization) fp16, like flash
attention: 2e-2 (abs + rel).
"""
import math
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels import KVStore
from kvpress.kernels.multi import decode_attention_multi_triton
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.store_access import gather_tokens


def decode_attention_reference(q, store, sm_scale, **kwargs):
    """One store through the multi-store twin."""
    return decode_attention_multi_reference(q, (store,), sm_scale, **kwargs)


def decode_attention_triton(q, store, sm_scale, **kwargs):
    """One store through the multi-store kernel."""
    return decode_attention_multi_triton(q, (store,), sm_scale, **kwargs)

# (kv_heads, group, head_dim, k_bits, v_bits, k_group, v_group, store dtype, page_size)
CASES = {
    "fp32-mha-contiguous": (2, 1, 64, 16, 16, None, None, torch.float32, None),
    "fp16-gqa4-paged": (2, 4, 64, 16, 16, None, None, torch.float16, 16),
    "int8k-int4v-gqa4-contiguous": (2, 4, 64, 8, 4, 16, 16, torch.float32, None),
    "int8k-int4v-gqa8-paged": (1, 8, 128, 8, 4, 32, 64, torch.float32, 16),
    "int4k-int8v-gqa1-paged": (2, 1, 64, 4, 8, 64, 32, torch.float32, 16),
    "bf16-gqa8-d256-contiguous": (1, 8, 256, 16, 16, None, None, torch.bfloat16, None),
}
RAGGED = ([0, 5, 7, 0], [37, 70, 7, 100])  # row 2 is empty; lengths are not multiples of any block size


def _store(case: str, seed: int = 0):
    kv_heads, group, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size = CASES[case]
    store = make_store(*RAGGED, kv_heads, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size, seed)
    q = torch.randn(len(RAGGED[0]), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    return store, q.to(DEVICE), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_plain_attention_over_dequantized_store(case: str) -> None:
    store, q, sm_scale = _store(case)
    out, lse = decode_attention_reference(q, store, sm_scale)
    expected_out, expected_lse = plain_attention(q.unsqueeze(2), store, sm_scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), expected_out.squeeze(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse.squeeze(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, sm_scale = _store(case, seed=7)
    out, lse = decode_attention_triton(q, store, sm_scale)
    ref_out, ref_lse = decode_attention_reference(q, store, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_empty_rows_give_zero_output_and_minus_inf_lse() -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa4-contiguous")
    for impl in (decode_attention_reference, decode_attention_triton):
        out, lse = impl(q, store, sm_scale)
        assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[[0, 1, 3]]).all())


@pytest.mark.parametrize("num_splits", [1, 5, 24])  # 24: most splits empty
def test_split_counts_do_not_change_the_result(num_splits: int) -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa8-paged", seed=3)
    out, lse = decode_attention_triton(q, store, sm_scale, num_splits=(num_splits,))
    ref_out, ref_lse = decode_attention_reference(q, store, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["int8k-int4v-gqa4-contiguous", "int4k-int8v-gqa1-paged", "bf16-gqa8-d256-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries_stay_close(case: str, dtype: torch.dtype) -> None:
    store, q, sm_scale = _store(case, seed=11)
    out, lse = decode_attention_triton(q.to(dtype), store, sm_scale)
    ref_out, ref_lse = decode_attention_reference(q.to(dtype), store, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_contiguous_store_is_sliced_without_copy() -> None:
    store, _, _ = _store("fp32-mha-contiguous")
    view = gather_tokens(store.k, store.block_table, 3, 50, contiguous=True)
    assert view.data_ptr() == store.k[:, :, 3:].data_ptr() and view.shape[2] == 47


def test_bad_inputs_raise_clear_errors() -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa4-contiguous")
    with pytest.raises(ValueError, match="decode q"):
        decode_attention_reference(q.unsqueeze(2), store, sm_scale)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention_reference(q[:, :3], store, sm_scale)
    with pytest.raises(ValueError, match="v last dim"):
        decode_attention_reference(q, replace(store, v_bits=8, k_group=16, v_group=16), sm_scale)
    with pytest.raises(ValueError, match="k_group=32 disagrees"):
        decode_attention_reference(q, replace(store, k_group=32), sm_scale)
    with pytest.raises(ValueError, match="k_scale and k_zero are required"):
        decode_attention_reference(q, replace(store, k_scale=None, k_zero=None), sm_scale)
    with pytest.raises(ValueError, match="kv_start <= kv_end"):
        bad_end = store.kv_end.clone()
        bad_end[0] = 10_000
        decode_attention_reference(q, replace(store, kv_end=bad_end), sm_scale)
    with pytest.raises(ValueError, match="must be a KVStore"):
        decode_attention_reference(q, (store.k, store.v), sm_scale)
    with pytest.raises(ValueError, match="larger than the 256"):  # any even head_dim up to 256: test_kernels_head_dim
        wide = make_store([0], [5], 1, 320)
        decode_attention_triton(torch.randn(1, 1, 320, device=DEVICE), wide, 1.0)


def test_store_fields_are_named() -> None:
    """A KVStore is built by field name; bounds default to [0, kv_end), encodings to 16 bits, not causal."""
    k = torch.zeros(1, 1, 4, 32)
    store = KVStore(k=k, v=k, block_table=torch.zeros(1, 1, dtype=torch.int32), kv_end=3)
    assert (store.kv_start, store.k_bits, store.v_bits, store.causal) == (0, 16, 16, False)
    assert store.page_size == 4 and store.capacity == 4 and store.tensors()[0] is k
    with pytest.raises(TypeError):
        KVStore(k, k, torch.zeros(1, 1, dtype=torch.int32), 3)  # keyword-only: no positional order to slice
