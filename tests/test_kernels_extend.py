"""extend_attention: Q queries over all stored tokens (no causal mask). The twin equals plain float64 attention,
Triton (interpreted on CPU) equals the twin to 1e-4 with fp32 queries, and merging with attention over a new
chunk reproduces attention over the whole sequence.
"""
import math

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels.extend import extend_attention_reference, extend_attention_triton
from kvpress.kernels.merge import merge_attention_states

# (kv_heads, group, num_queries, head_dim, k_bits, v_bits, k_group, v_group, store dtype, page_size)
CASES = {
    "fp32-gqa1-q5-contiguous": (2, 1, 5, 64, 16, 16, None, None, torch.float32, None),
    "fp16-gqa4-q3-paged": (1, 4, 3, 64, 16, 16, None, None, torch.float16, 16),
    "int8k-int4v-gqa8-q9-paged": (1, 8, 9, 64, 8, 4, 16, 32, torch.float32, 16),
    "int8k-int4v-gqa4-q2-d128-contiguous": (2, 4, 2, 128, 8, 4, 32, 32, torch.float32, None),
}
RAGGED = ([0, 9, 4], [45, 70, 4])  # row 2 holds no stored tokens


def _inputs(case: str, seed: int = 0):
    kv_heads, group, num_queries, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size = CASES[case]
    store = make_store(*RAGGED, kv_heads, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(RAGGED[0]), kv_heads * group, num_queries, head_dim, generator=gen)
    return store, q.to(DEVICE), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_plain_attention(case: str) -> None:
    store, q, sm_scale = _inputs(case)
    out, lse = extend_attention_reference(q, *store.args(), sm_scale, *store.bits())
    expected_out, expected_lse = plain_attention(q, store, sm_scale)
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, sm_scale = _inputs(case, seed=5)
    out, lse = extend_attention_triton(q, *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = extend_attention_reference(q, *store.args(), sm_scale, *store.bits())
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())


def test_half_precision_queries_stay_close() -> None:
    store, q, sm_scale = _inputs("int8k-int4v-gqa8-q9-paged", seed=8)
    out, lse = extend_attention_triton(q.bfloat16(), *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = extend_attention_reference(q.bfloat16(), *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", [extend_attention_reference, extend_attention_triton])
def test_store_attention_merged_with_causal_chunk_equals_full_causal_attention(impl) -> None:
    kv_heads, group, past, chunk, head_dim = 2, 2, 30, 6, 64
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, kv_heads, past + chunk, head_dim, generator=gen)
    values = torch.randn(1, kv_heads, past + chunk, head_dim, generator=gen)
    q = torch.randn(1, kv_heads * group, chunk, head_dim, generator=gen)
    sm_scale = 0.125
    past_out, past_lse = impl(
        q.to(DEVICE), keys[:, :, :past].to(DEVICE), values[:, :, :past].to(DEVICE), None, None, None, None,
        torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.tensor([0], dtype=torch.int32, device=DEVICE),
        torch.tensor([past], dtype=torch.int32, device=DEVICE), sm_scale, 16, 16, None, None,
    )  # fmt: skip
    new_k = keys[:, :, past:].repeat_interleave(group, 1)
    new_v = values[:, :, past:].repeat_interleave(group, 1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    scores = (q @ new_k.transpose(-1, -2) * sm_scale).masked_fill(~causal, -math.inf)
    chunk_lse = torch.logsumexp(scores, -1)
    chunk_out = torch.softmax(scores, -1) @ new_v
    out, lse = merge_attention_states(past_out.cpu(), past_lse.cpu(), chunk_out, chunk_lse)

    full_k = keys.repeat_interleave(group, 1)
    full_v = values.repeat_interleave(group, 1)
    full_mask = torch.ones(chunk, past + chunk, dtype=torch.bool).tril(diagonal=past)
    full_scores = (q @ full_k.transpose(-1, -2) * sm_scale).masked_fill(~full_mask, -math.inf)
    torch.testing.assert_close(out, torch.softmax(full_scores, -1) @ full_v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(full_scores, -1), atol=1e-4, rtol=1e-4)


def test_decode_shaped_query_is_rejected() -> None:
    store, q, sm_scale = _inputs("fp32-gqa1-q5-contiguous")
    with pytest.raises(ValueError, match="extend q"):
        extend_attention_reference(q[:, :, 0], *store.args(), sm_scale, *store.bits())
