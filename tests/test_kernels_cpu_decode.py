"""The compiled CPU decode kernel (kernels/cpu_decode.c through cpu_multi) equals its oracle, the torch twin, for every
layout it takes: 8 / 4 / 2-bit keys (per token or per channel) and values, one or several groups, head_dim 64 and
128, contiguous and paged,
int and per-row bounds (a row attending nothing), the fp sinks and window in the same softmax, rotated stores, the
H2O logits; it hands what it does not take to the twin, fails cleanly on a bad block table, and without a compiler
warns once and runs the twin."""
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import make_store

from kvpress import kernels
from kvpress.kernels import cpu_decode
from kvpress.kernels.cpu_multi import decode_attention_multi_cpu
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.rotation import hadamard_rotation

KV_HEADS, GROUP = 2, 3
STARTS, ENDS = [0, 5, 0], [37, 70, 0]  # row 2 attends nothing in the quantized store

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler on this machine")


def _stores(head_dim, k_bits, v_bits, k_group, v_group, page_size, int_bounds=False, rotated=False):
    """fp16 sinks, a quantized middle, an fp16 window (the decode layout of a quantized layer)."""
    sink = make_store([0, 0, 0], [4, 4, 4], KV_HEADS, head_dim, dtype=torch.float16, device="cpu", seed=1)
    ends = [37, 70, 40] if int_bounds else ENDS  # (int bounds: every row's pages exist up to token 33)
    middle = make_store(STARTS, ends, KV_HEADS, head_dim, k_bits, v_bits, k_group or head_dim, v_group or head_dim,
                        torch.float32, page_size, 2, "cpu")  # fmt: skip
    middle = replace(middle, k_group=k_group, v_group=v_group)
    window = make_store([0, 0, 0], [9, 9, 9], KV_HEADS, head_dim, dtype=torch.float16, device="cpu", seed=3)
    sink, window = (replace(s, kv_start=0, kv_end=s.kv_end[0].item()) for s in (sink, window))
    if int_bounds:
        middle = replace(middle, kv_start=2, kv_end=33)
    if rotated:
        rotation = hadamard_rotation(head_dim)
        middle = replace(middle, k_rotation=rotation, v_rotation=rotation)
    return sink, middle, window


ENCODINGS = {  # k_bits, v_bits, k_group, v_group
    "int8-int4-g32": (8, 4, None, 32),  # the default layout at head_dim 64
    "int8-int8-g16": (8, 8, 16, 16),
    "int4-int4-g8": (4, 4, 8, 8),  # several groups per part
    "int4-int2-gNone": (4, 2, None, None),
    "int2-int2-g16": (2, 2, 16, 16),
    "int2-int8-g32": (2, 8, 32, 32),
}


def _check_equal(q, stores, offsets, length):
    got_scores = torch.full((*q.shape[:2], length), -7.0)
    want_scores = got_scores.clone()
    out, lse = decode_attention_multi_cpu(q, stores, 0.3, scores=got_scores, score_offsets=offsets)
    ref_out, ref_lse = decode_attention_multi_reference(q, stores, 0.3, scores=want_scores, score_offsets=offsets)
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, ref_lse, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(got_scores, want_scores, atol=3e-5, rtol=3e-5)
    out, lse = decode_attention_multi_cpu(q, stores, 0.3)  # without scores: the plain stores join the kernel's softmax
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, ref_lse, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("int_bounds", [False, True])
def test_compiled_decode_equals_the_twin(head_dim, encoding, page_size, int_bounds) -> None:
    stores = _stores(head_dim, *ENCODINGS[encoding], page_size, int_bounds)
    assert cpu_decode.takes(stores[1], GROUP, head_dim)
    q = torch.randn(3, KV_HEADS * GROUP, head_dim, generator=torch.Generator().manual_seed(5))
    _check_equal(q, stores, (0, 4, 74), 83)


@pytest.mark.parametrize("encoding", ["int8-int4-g32", "int4-int2-gNone"])
def test_rotated_store_and_unrotated_window_share_the_softmax(encoding) -> None:
    stores = _stores(64, *ENCODINGS[encoding], None, rotated=True)
    q = torch.randn(3, KV_HEADS * GROUP, 64, generator=torch.Generator().manual_seed(6))
    _check_equal(q, stores, (0, 4, 74), 83)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 4])
def test_plain_stores_of_any_float_dtype_and_paging_join_the_softmax(dtype, page_size) -> None:
    """The fp window read in place by the kernel (no float32 copy): every float dtype, contiguous or paged."""
    sink, middle, _ = _stores(64, 8, 4, None, 32, 16)
    window = make_store([0, 0, 0], [11, 11, 11], KV_HEADS, 64, dtype=dtype, page_size=page_size, device="cpu",
                        seed=4)
    window = replace(window, kv_start=1, kv_end=11)
    assert cpu_decode.joins(window, 64)
    q = torch.randn(3, KV_HEADS * GROUP, 64, generator=torch.Generator().manual_seed(8))
    _check_equal(q, (sink, middle, window), (0, 4, 74), 85)


def test_sixteen_bit_stores_alone_with_the_h2o_logits() -> None:
    """H2O over a 16-bit cache: no codes store, the kernel attends the fp stores and writes their logits."""
    sink, _, window = _stores(64, 8, 4, None, 32, None)
    q = torch.randn(3, KV_HEADS * GROUP, 64, generator=torch.Generator().manual_seed(9))
    _check_equal(q, (sink, window), (0, 4), 13)


def test_threads_give_the_same_result() -> None:
    stores = _stores(64, 8, 4, None, 32, 16)
    q = torch.randn(3, KV_HEADS * GROUP, 64, generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention_multi_cpu(q, stores, 0.3)
        torch.set_num_threads(2)
        two = decode_attention_multi_cpu(q, stores, 0.3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("head_dim,k_bits,v_bits,block,v_group", [(64, 2, 2, 64, None), (64, 8, 4, 16, 32),
                                                                   (128, 4, 2, 32, None)])
def test_keys_per_channel_equal_the_twin(head_dim, k_bits, v_bits, block, v_group) -> None:
    """KIVI keys (k_block: scales per channel over blocks, slot layout), rows starting and ending inside blocks."""
    from test_kernels_per_channel import KV_HEADS as CHANNEL_HEADS, channel_store

    middle = channel_store([3, 0], [2 * block + 5, block + 3], head_dim, k_bits, v_bits, block, v_group, seed=k_bits)
    assert cpu_decode.takes(middle, GROUP, head_dim)
    window = make_store([0, 0], [6, 6], CHANNEL_HEADS, head_dim, dtype=torch.float16, device="cpu", seed=6)
    q = torch.randn(2, CHANNEL_HEADS * GROUP, head_dim, generator=torch.Generator().manual_seed(3))
    _check_equal(q, (middle, replace(window, kv_start=0, kv_end=6)), (0, 3 * block), 3 * block + 6)


def test_stores_it_does_not_take_go_to_the_twin(monkeypatch) -> None:
    """head_dim 32 stays with the twin (same result, the kernel never called)."""
    calls = []
    monkeypatch.setattr(cpu_decode, "decode_store", lambda *a, **k: calls.append(1))
    stores = _stores(32, 8, 4, None, 16, None)
    assert not cpu_decode.takes(stores[1], GROUP, 32)
    q = torch.randn(3, KV_HEADS * GROUP, 32)
    out, _ = decode_attention_multi_cpu(q, stores, 0.3)
    torch.testing.assert_close(out, decode_attention_multi_reference(q, stores, 0.3)[0])
    assert not calls


def test_dispatch_uses_the_compiled_kernel_on_cpu_unless_the_twin_is_forced(monkeypatch) -> None:
    calls = []
    real = cpu_decode.decode_store
    monkeypatch.setattr(cpu_decode, "decode_store", lambda *a, **k: calls.append(1) or real(*a, **k))
    stores = _stores(64, 8, 4, None, 32, None)
    q = torch.randn(3, KV_HEADS * GROUP, 64)
    with kernels.use_backend(None):
        kernels.decode_attention_multi(q, stores, 0.3)
    assert calls == [1]
    with kernels.use_backend("reference"):
        kernels.decode_attention_multi(q, stores, 0.3)
    assert calls == [1]


def test_bad_block_table_fails_cleanly_and_the_next_call_works() -> None:
    sink, middle, window = _stores(64, 8, 4, None, 32, 16)
    table = middle.block_table.clone()
    table[1, 0] = middle.k.shape[0] + 5  # a page the pool does not have, in a span row 1 attends
    q = torch.randn(3, KV_HEADS * GROUP, 64)
    with pytest.raises(ValueError, match="outside its store.s pool"):
        decode_attention_multi_cpu(q, (sink, replace(middle, block_table=table), window), 0.3)
    out, _ = decode_attention_multi_cpu(q, (sink, middle, window), 0.3)
    torch.testing.assert_close(out, decode_attention_multi_reference(q, (sink, middle, window), 0.3)[0],
                               atol=3e-5, rtol=3e-5)


def test_without_a_compiler_it_warns_once_and_runs_the_twin(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_decode, "_WARNED", type(cpu_decode._WARNED)())
    cpu_decode._load.cache_clear()
    try:
        stores = _stores(64, 8, 4, None, 32, None)
        q = torch.randn(3, KV_HEADS * GROUP, 64)
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            out, _ = decode_attention_multi_cpu(q, stores, 0.3)
        torch.testing.assert_close(out, decode_attention_multi_reference(q, stores, 0.3)[0])
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_decode._load.cache_clear()


def test_build_is_cached_per_source_and_machine(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVPRESS_CACHE_DIR", str(tmp_path))
    first = cpu_decode.build()
    assert first.is_file() and first.parent == tmp_path / "kernels"
    stamp = first.stat().st_mtime_ns
    assert cpu_decode.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
