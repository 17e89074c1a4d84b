"""attention_scores: attention mass per stored token. The twin equals a float64 computation, Triton
(interpreted on CPU) equals the twin to 1e-4 with fp32 queries, mass is zero outside [kv_start, kv_end), and
with the lse of the same queries each row's mass sums to (GQA group x queries).
"""
import math

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_scores

from kvpress.kernels.extend import extend_attention_reference
from kvpress.kernels.scores import attention_scores_reference, attention_scores_triton

# (kv_heads, group, num_queries, head_dim, k_bits, k_group, store dtype, page_size)
CASES = {
    "fp32-gqa1-contiguous": (2, 1, 3, 64, 16, None, torch.float32, None),
    "fp16-gqa4-paged": (1, 4, 1, 64, 16, None, torch.float16, 16),
    "int8k-gqa8-paged": (1, 8, 2, 64, 8, 16, torch.float32, 16),
    "int4k-gqa4-d128-contiguous": (2, 4, 2, 128, 4, 64, torch.float32, None),
}
RAGGED = ([3, 0, 6], [50, 75, 6])  # row 2 is empty


def _inputs(case: str, seed: int = 0):
    kv_heads, group, num_queries, head_dim, k_bits, k_group, dtype, page_size = CASES[case]
    store = make_store(*RAGGED, kv_heads, head_dim, k_bits, 16, k_group, None, dtype, page_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(RAGGED[0]), kv_heads * group, num_queries, head_dim, generator=gen).to(DEVICE)
    sm_scale = 1.0 / math.sqrt(head_dim)
    _, lse = extend_attention_reference(q, *store.args(), sm_scale, *store.bits())
    key_args = (store.k, store.k_scale, store.k_zero, store.block_table, store.kv_start, store.kv_end)
    return store, q, lse, key_args, sm_scale


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_and_sums_to_group_times_queries(case: str) -> None:
    store, q, lse, key_args, sm_scale = _inputs(case)
    mass = attention_scores_reference(q, *key_args, lse, sm_scale, store.k_bits, store.k_group)
    assert mass.shape == (q.shape[0], store.k.shape[1], max(RAGGED[1])) and mass.dtype == torch.float32
    torch.testing.assert_close(mass.cpu().double(), plain_scores(q, store, lse, sm_scale), atol=1e-5, rtol=1e-5)
    rows_per_kv_head = q.shape[1] // store.k.shape[1] * q.shape[2]
    torch.testing.assert_close(mass[:2].sum(-1).cpu(), torch.full((2, store.k.shape[1]), float(rows_per_kv_head)))
    assert bool((mass[0, :, :3] == 0).all()) and bool((mass[2] == 0).all())


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, lse, key_args, sm_scale = _inputs(case, seed=9)
    mass = attention_scores_triton(q, *key_args, lse, sm_scale, store.k_bits, store.k_group)
    expected = attention_scores_reference(q, *key_args, lse, sm_scale, store.k_bits, store.k_group)
    torch.testing.assert_close(mass, expected, atol=1e-4, rtol=1e-4)


def test_half_precision_queries_stay_close() -> None:
    store, q, lse, key_args, sm_scale = _inputs("int8k-gqa8-paged", seed=2)
    mass = attention_scores_triton(q.half(), *key_args, lse, sm_scale, store.k_bits, store.k_group)
    expected = attention_scores_reference(q.half(), *key_args, lse, sm_scale, store.k_bits, store.k_group)
    torch.testing.assert_close(mass, expected, atol=2e-2, rtol=2e-2)


def test_lse_shape_is_checked() -> None:
    store, q, lse, key_args, sm_scale = _inputs("fp32-gqa1-contiguous")
    with pytest.raises(ValueError, match="lse must be"):
        attention_scores_reference(q, *key_args, lse[:, :, 0], sm_scale, store.k_bits, store.k_group)
