"""Test-only KV stores for the kernel tests: a tiny independent quantizer (per-group min/max, fp16 scale/zero,
split-halves int4 packing per docs/STORAGE_LAYOUT.md), contiguous and paged layouts, and plain attention.

Kept independent of kvpress.quant on purpose; the tests at the bottom pin the helpers' own behaviour.
"""
import math
from dataclasses import dataclass

import pytest
import torch

from kvpress.kernels import KVStore

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on CPU (tests/conftest.py)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize (..., D) to uint8 codes (..., D, D/2 or D/4 packed) plus fp16 scale/zero (..., D/group)."""
    levels = (1 << bits) - 1
    grouped = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    low = grouped.amin(-1)
    high = grouped.amax(-1)
    scale = ((high - low) / levels).clamp_min(1e-4).half()
    zero = low.half()
    codes = ((grouped - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels)
    codes = codes.reshape(x.shape).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    if bits == 2:  # split quarters: quarter i in bits 2i, 2i + 1
        quarter = x.shape[-1] // 4
        codes = sum(codes[..., i * quarter : (i + 1) * quarter] << (2 * i) for i in range(4)).to(torch.uint8)
    return codes, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of quantize_groups up to rounding, in float64: x = q * scale + zero per group."""
    if bits == 4:
        codes = torch.cat((codes & 0x0F, codes >> 4), dim=-1)
    if bits == 2:
        codes = torch.cat([(codes >> (2 * i)) & 3 for i in range(4)], dim=-1)
    values = codes.double()
    groups = scale.shape[-1]
    grouped = values.reshape(*values.shape[:-1], groups, values.shape[-1] // groups)
    return (grouped * scale.double()[..., None] + zero.double()[..., None]).reshape(values.shape)


@dataclass(frozen=True, eq=False, kw_only=True)
class Store(KVStore):
    """A KVStore (tensor bounds) plus the dense float64 K/V (B, Hkv, T, D) the kernels should see."""

    dense_k: torch.Tensor
    dense_v: torch.Tensor


def _encode(x: torch.Tensor, bits: int, group: int | None, dtype: torch.dtype):
    """Encode dense (B, Hkv, T, D) into (field, scale, zero, dense float64 the kernel must reproduce)."""
    if bits == 16:
        field = x.to(dtype)
        return field, None, None, field.double()
    codes, scale, zero = quantize_groups(x, bits, group)
    return codes, scale, zero, dequantize_groups(codes, scale, zero, bits)


def _to_pages(field: torch.Tensor, page_size: int, order: torch.Tensor, pool: int) -> torch.Tensor:
    """Scatter a contiguous (B, Hkv, T, X) field into a (pool, Hkv, S, X) page pool at page ids `order`."""
    batch, heads, tokens, width = field.shape
    n_pages = tokens // page_size
    pages = field.reshape(batch, heads, n_pages, page_size, width).permute(0, 2, 1, 3, 4)
    out = torch.zeros(pool, heads, page_size, width, dtype=field.dtype)
    out[order.reshape(-1)] = pages.reshape(batch * n_pages, heads, page_size, width)
    return out


def make_store(
    kv_start: list[int],
    kv_end: list[int],
    kv_heads: int,
    head_dim: int,
    k_bits: int = 16,
    v_bits: int = 16,
    k_group: int | None = None,
    v_group: int | None = None,
    dtype: torch.dtype = torch.float32,
    page_size: int | None = None,
    seed: int = 0,
    device: str = DEVICE,
) -> Store:
    """Random store holding rows [kv_start[b], kv_end[b]); contiguous when page_size is None, else paged with a
    shuffled pool, spare pages, and out-of-range block-table entries past each row's last page."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(kv_end)
    tokens = max(max(kv_end), 1)
    capacity = tokens if page_size is None else -(-tokens // page_size) * page_size
    dense = torch.randn(2, batch, kv_heads, tokens, head_dim, generator=gen) * 1.5
    dense = torch.cat((dense, torch.randn(2, batch, kv_heads, capacity - tokens, head_dim, generator=gen)), 3)
    k, k_scale, k_zero, dense_k = _encode(dense[0], k_bits, k_group, dtype)
    v, v_scale, v_zero, dense_v = _encode(dense[1], v_bits, v_group, dtype)
    if page_size is None:
        block_table = torch.arange(batch, dtype=torch.int32)[:, None]
    else:
        n_pages = capacity // page_size
        pool = batch * n_pages + 3
        order = torch.randperm(pool, generator=gen)[: batch * n_pages].reshape(batch, n_pages)
        k, v = _to_pages(k, page_size, order, pool), _to_pages(v, page_size, order, pool)
        if k_scale is not None:
            k_scale, k_zero = (_to_pages(t, page_size, order, pool) for t in (k_scale, k_zero))
        if v_scale is not None:
            v_scale, v_zero = (_to_pages(t, page_size, order, pool) for t in (v_scale, v_zero))
        block_table = order.to(torch.int32).clone()
        for b, end in enumerate(kv_end):
            block_table[b, -(-end // page_size) :] = 10_000 + b  # never read: past the row's last page
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Store(
        k=on(k), v=on(v), k_scale=on(k_scale), k_zero=on(k_zero), v_scale=on(v_scale), v_zero=on(v_zero),
        block_table=block_table.to(device), kv_start=torch.tensor(kv_start, dtype=torch.int32, device=device),
        kv_end=torch.tensor(kv_end, dtype=torch.int32, device=device), k_bits=k_bits, v_bits=v_bits,
        k_group=k_group, v_group=v_group, dense_k=dense_k, dense_v=dense_v,
    )


def plain_attention(q: torch.Tensor, store: Store, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 softmax attention of q (B, Hq, Q, D) over each row's dense tokens [kv_start, kv_end), row by row."""
    batch, q_heads, num_queries, head_dim = q.shape
    group = q_heads // store.dense_k.shape[1]
    out = torch.zeros(batch, q_heads, num_queries, head_dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads, num_queries), -math.inf, dtype=torch.float64)
    for b in range(batch):
        lo, hi = int(store.kv_start[b]), int(store.kv_end[b])
        if hi <= lo:
            continue
        keys = store.dense_k[b, :, lo:hi].repeat_interleave(group, 0)
        values = store.dense_v[b, :, lo:hi].repeat_interleave(group, 0)
        scores = q[b].double().cpu() @ keys.transpose(-1, -2) * sm_scale
        lse[b] = torch.logsumexp(scores, -1)
        out[b] = torch.softmax(scores, -1) @ values
    return out, lse


def plain_scores(q: torch.Tensor, store: Store, lse: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Float64 attention mass (B, Hkv, max kv_end): exp(q.k*scale - lse) summed over GQA heads and queries."""
    batch, q_heads, num_queries, _ = q.shape
    kv_heads = store.dense_k.shape[1]
    group = q_heads // kv_heads
    total = int(store.kv_end.max())
    out = torch.zeros(batch, kv_heads, total, dtype=torch.float64)
    for b in range(batch):
        lo, hi = int(store.kv_start[b]), int(store.kv_end[b])
        if hi <= lo:
            continue
        keys = store.dense_k[b, :, lo:hi].repeat_interleave(group, 0)
        probs = torch.exp(q[b].double().cpu() @ keys.transpose(-1, -2) * sm_scale - lse[b].double().cpu()[..., None])
        out[b, :, lo:hi] = probs.reshape(kv_heads, group * num_queries, hi - lo).sum(1)
    return out


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 16), (4, 64), (2, 16), (2, 32)])
def test_quantizer_round_trip_error_is_at_most_half_a_step(bits: int, group: int) -> None:
    x = torch.randn(3, 2, 5, 64)
    codes, scale, zero = quantize_groups(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * bits // 8
    err = (dequantize_groups(codes, scale, zero, bits) - x.double()).abs()
    step = scale.double().repeat_interleave(group, -1)
    assert bool((err <= step * 0.5 + 2e-3).all())


def test_int4_packing_is_split_halves() -> None:
    x = torch.zeros(1, 8)
    x[0, 1] = 1.0  # first half, element 1 -> low nibble of byte 1
    x[0, 6] = 1.0  # second half, element 6 -> high nibble of byte 2
    codes, _, _ = quantize_groups(x, 4, 8)
    assert codes.tolist() == [[0, 15, 240, 0]]


def test_paged_store_holds_the_same_tokens_as_contiguous() -> None:
    contiguous = make_store([0, 2], [20, 33], kv_heads=2, head_dim=32, k_bits=8, k_group=16, seed=3)
    paged = make_store([0, 2], [20, 33], kv_heads=2, head_dim=32, k_bits=8, k_group=16, seed=3, page_size=16)
    for b, end in enumerate([20, 33]):
        for t in range(end):
            page = int(paged.block_table[b, t // 16])
            assert torch.equal(paged.k[page, :, t % 16], contiguous.k[b, :, t])
            assert torch.equal(paged.k_scale[page, :, t % 16], contiguous.k_scale[b, :, t])
