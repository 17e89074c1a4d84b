"""decode_attention: the torch twin equals plain float64 attention over independently dequantized K/V, and the
Triton kernel (interpreted on CPU) equals the twin, on contiguous and paged, fp and int8-K/int4-V stores.

Tolerances: fp32 queries use exact fp32 dots in both versions, so outputs agree to 1e-4 (abs + rel) - well
inside the 1e-3 budget; fp16/bf16 queries make the kernel's dot operands (and the dequantization) fp16, like flash
attention: 2e-2 (abs + rel).
"""
import math

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels.decode import (
    decode_attention_reference,
    decode_attention_triton,
    store_attention_reference,
    store_attention_triton,
)
from kvpress.kernels.factored import DEQUANT_ENV, dequant_mode, factored_fields
from kvpress.kernels.extend import extend_attention_triton
from kvpress.kernels.store_access import gather_tokens

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
    out, lse = decode_attention_reference(q, *store.args(), sm_scale, *store.bits())
    expected_out, expected_lse = plain_attention(q.unsqueeze(2), store, sm_scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), expected_out.squeeze(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse.squeeze(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, sm_scale = _store(case, seed=7)
    out, lse = decode_attention_triton(q, *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = decode_attention_reference(q, *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_empty_rows_give_zero_output_and_minus_inf_lse() -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa4-contiguous")
    for impl in (decode_attention_reference, decode_attention_triton):
        out, lse = impl(q, *store.args(), sm_scale, *store.bits())
        assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[[0, 1, 3]]).all())


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (5, 16), (24, 32)])  # 24: most splits empty
def test_split_counts_do_not_change_the_result(num_splits: int, block_n: int) -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa8-paged", seed=3)
    out, lse = store_attention_triton(
        q.unsqueeze(2), *store.args(), sm_scale, *store.bits(), block_n=block_n, num_splits=num_splits
    )
    ref_out, ref_lse = decode_attention_reference(q, *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(out.squeeze(2), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.squeeze(2), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["int8k-int4v-gqa4-contiguous", "int4k-int8v-gqa1-paged", "bf16-gqa8-d256-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries_stay_close(case: str, dtype: torch.dtype) -> None:
    store, q, sm_scale = _store(case, seed=11)
    out, lse = decode_attention_triton(q.to(dtype), *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = decode_attention_reference(q.to(dtype), *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_contiguous_store_is_sliced_without_copy() -> None:
    store, _, _ = _store("fp32-mha-contiguous")
    view = gather_tokens(store.k, store.block_table, 3, 50, contiguous=True)
    assert view.data_ptr() == store.k[:, :, 3:].data_ptr() and view.shape[2] == 47


def test_bad_inputs_raise_clear_errors() -> None:
    store, q, sm_scale = _store("int8k-int4v-gqa4-contiguous")
    args = store.args()
    with pytest.raises(ValueError, match="decode q"):
        decode_attention_reference(q.unsqueeze(2), *args, sm_scale, *store.bits())
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention_reference(q[:, :3], *args, sm_scale, *store.bits())
    with pytest.raises(ValueError, match="v last dim"):
        decode_attention_reference(q, *args, sm_scale, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="k_group=32 disagrees"):
        decode_attention_reference(q, *args, sm_scale, 8, 4, 32, 16)
    with pytest.raises(ValueError, match="k_scale and k_zero are required"):
        decode_attention_reference(q, store.k, store.v, None, None, *args[4:], sm_scale, *store.bits())
    with pytest.raises(ValueError, match="kv_start <= kv_end"):
        bad_end = store.kv_end.clone()
        bad_end[0] = 10_000
        decode_attention_reference(q, *args[:8], bad_end, sm_scale, *store.bits())
    with pytest.raises(ValueError, match="power of two"):
        odd = make_store([0], [5], 1, 48)
        decode_attention_triton(torch.randn(1, 1, 48, device=DEVICE), *odd.args(), 1.0, *odd.bits())


# ----------------------------------------------------------------------------------------------------------
# Factored dequantization (dequant="factored" / KVPRESS_DEQUANT=factored): the kernel feeds raw codes to the dots
# and applies scale/zero to scores and probabilities. Same oracle (the torch twin) and the same tolerances as above.
# Max abs errors seen vs the twin (CPU interpreter, these cases, decode and Q=3): fp32 queries out 3.3e-6, lse 1.4e-6;
# fp16/bf16 queries out 8.9e-4, lse 1.4e-6 - the key codes and their affine stay exact/fp32 - where the register path
# gives out 3.0e-3, lse 1.1e-3 on the same stores.
# ----------------------------------------------------------------------------------------------------------

# (kv_heads, group, head_dim, k_bits, v_bits, k_group, v_group, page_size); None groups: one group per token
FACTORED_CASES = {
    "int8k-int4v-kNone-vNone-d64-gqa4-paged": (2, 4, 64, 8, 4, None, None, 16),
    "int8k-int4v-kNone-v32-d64-gqa4-paged": (2, 4, 64, 8, 4, None, 32, 16),  # V: one group per half
    "int8k-int4v-kNone-v32-d128-gqa4-paged": (2, 4, 128, 8, 4, None, 32, 16),  # V: 2 groups per half (3D tiles)
    "int8k-int4v-k32-v32-d128-gqa4-contiguous": (2, 4, 128, 8, 4, 32, 32, None),  # K and V: 2 groups per half
    "int8k-int4v-k64-vNone-d128-gqa4-paged": (1, 4, 128, 8, 4, 64, None, 16),  # K: one group per half
    "int4k-int8v-k16-v16-d64-gqa4-paged": (1, 4, 64, 4, 8, 16, 16, 16),  # 4-bit K / 8-bit V, 2 groups per half
}


def _factored_store(case: str, seed: int = 0, num_queries: int | None = None):
    """Store and q for a FACTORED_CASES entry; q is (B, Hq, D), or (B, Hq, Q, D) when num_queries is given."""
    kv_heads, group, head_dim, k_bits, v_bits, k_group, v_group, page_size = FACTORED_CASES[case]
    store = make_store(
        *RAGGED, kv_heads, head_dim, k_bits, v_bits, k_group or head_dim, v_group or head_dim,
        torch.float32, page_size, seed,
    )  # fmt: skip
    store.k_group, store.v_group = k_group, v_group  # pass None through to the kernels
    shape = (len(RAGGED[0]), kv_heads * group) + ((num_queries,) if num_queries else ()) + (head_dim,)
    q = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return store, q.to(DEVICE), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", FACTORED_CASES)
def test_factored_triton_equals_reference(case: str, dtype: torch.dtype) -> None:
    kv_heads, _, head_dim, k_bits, v_bits, k_group, v_group, _ = FACTORED_CASES[case]
    assert factored_fields("factored", head_dim, k_bits, v_bits, k_group or head_dim, v_group or head_dim) == (
        True,
        True,
    )
    store, q, sm_scale = _factored_store(case, seed=7)
    q = q.to(dtype)
    out, lse = decode_attention_triton(q, *store.args(), sm_scale, *store.bits(), dequant="factored")
    ref_out, ref_lse = decode_attention_reference(q, *store.args(), sm_scale, *store.bits())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())  # the empty row


@pytest.mark.parametrize("num_splits,block_n", [(5, 16), (24, 32)])
def test_factored_split_counts_do_not_change_the_result(num_splits: int, block_n: int) -> None:
    store, q, sm_scale = _factored_store("int8k-int4v-k32-v32-d128-gqa4-contiguous", seed=3)
    out, lse = store_attention_triton(
        q.unsqueeze(2), *store.args(), sm_scale, *store.bits(),
        block_n=block_n, num_splits=num_splits, dequant="factored",
    )  # fmt: skip
    ref_out, ref_lse = decode_attention_reference(q, *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(out.squeeze(2), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.squeeze(2), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["int8k-int4v-kNone-v32-d64-gqa4-paged", "int8k-int4v-k32-v32-d128-gqa4-contiguous"])
def test_factored_extend_equals_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Extend (Q > 1) shares the kernel: both through the dequant argument and through $KVPRESS_DEQUANT."""
    store, q, sm_scale = _factored_store(case, seed=5, num_queries=3)
    ref_out, ref_lse = store_attention_reference(q, *store.args(), sm_scale, *store.bits())
    out, lse = store_attention_triton(q, *store.args(), sm_scale, *store.bits(), dequant="factored")
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv(DEQUANT_ENV, "factored")
    env_out, env_lse = extend_attention_triton(q, *store.args(), sm_scale, *store.bits())
    torch.testing.assert_close(env_out, out, atol=0, rtol=0)
    torch.testing.assert_close(env_lse, lse, atol=0, rtol=0)


def test_dequant_mode_defaults_to_registers_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEQUANT_ENV, raising=False)
    assert dequant_mode() == "registers" and dequant_mode("factored") == "factored"
    monkeypatch.setenv(DEQUANT_ENV, " Factored ")
    assert dequant_mode() == "factored" and dequant_mode("registers") == "registers"
    monkeypatch.setenv(DEQUANT_ENV, "fused")
    with pytest.raises(ValueError, match=DEQUANT_ENV):
        dequant_mode()
    with pytest.raises(ValueError, match="dequant must be one of"):
        dequant_mode("bogus")


@pytest.mark.parametrize(
    "args,expected",
    [
        (("registers", 128, 8, 4, 128, 32), (False, False)),
        (("factored", 128, 8, 4, 128, 32), (True, True)),
        (("factored", 64, 8, 4, 64, 16), (True, True)),  # 16 = 2 groups per half
        (("factored", 256, 8, 4, 32, 64), (True, True)),  # 32 = 4 groups per half
        (("factored", 256, 8, 4, 16, 128), (False, True)),  # 16 = 8 groups per half: registers
        (("factored", 64, 8, 4, 8, 64), (False, True)),  # 8 < tl.dot's minimum: registers
        (("factored", 64, 16, 16, 64, 64), (False, False)),  # unquantized stores keep the register path
    ],
)
def test_factored_fields_choose_the_path_per_field(args: tuple, expected: tuple) -> None:
    assert factored_fields(*args) == expected


def test_factored_falls_back_to_registers_for_narrow_groups() -> None:
    """Groups of 8 (below tl.dot's minimum) run the register kernel unchanged under dequant="factored"."""
    store = make_store(*RAGGED, 1, 64, 8, 4, 8, 8, torch.float32, 16, 2)
    q = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    factored = decode_attention_triton(q, *store.args(), 0.125, *store.bits(), dequant="factored")
    registers = decode_attention_triton(q, *store.args(), 0.125, *store.bits(), dequant="registers")
    for a, b in zip(factored, registers):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
