"""Keys quantized per channel over blocks of tokens (KIVI, `kc<N>`): the math, the store layout, the torch twins, the
spec grammar and its fallbacks, and a cache that writes its middle in whole blocks (prefill, chunked prefill, decode,
a press)."""
from __future__ import annotations

import math

import pytest
import torch

import kvpress
from kvpress.config import resolve_config
from kvpress.hf_compat import cache_kwargs
from kvpress.kernels import KVStore
from kvpress.kernels.affine import dequantize, dequantize_channels, quantize, quantize_channels
from kvpress.kernels.quantize import quantize_store_reference
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.reference_plain import decode_attention_multi_plain, extend_attention_multi_plain
from kvpress.quant import QuantSpec
from tiny_models import head_dim_model


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 64])
def test_channel_codes_bound_error_per_block_and_channel(bits: int, block: int) -> None:
    gen = torch.Generator().manual_seed(bits * block)
    x = torch.randn(2, 3, 128, 64, generator=gen) * torch.linspace(0.1, 8.0, 64)  # outlier channels
    codes, scale, zero = quantize_channels(x, bits, block)
    assert codes.shape == (2, 3, 128, 64 * bits // 8) and scale.shape == zero.shape == (2, 3, 128, 64 // block)
    back = dequantize_channels(codes, scale, zero, bits, block, 64)
    # slot layout: channel d of block i at slot i * block + d // (64 / block), column d % (64 / block)
    per_slot = 64 // block
    steps = scale.float().reshape(2, 3, 128 // block, 64).repeat_interleave(block, dim=2)
    d = 37
    assert torch.equal(steps[:, :, block + 3, d], scale[:, :, block + d // per_slot, d % per_slot].float())
    assert bool(((back - x).abs() <= steps / 2 + 1e-5 * x.abs().amax()).all())
    # a channel's step follows its own range: the small channels get small steps (the point of KIVI)
    assert steps[..., 0].mean() < steps[..., 63].mean() / 10


def test_channel_codes_refuse_partial_blocks() -> None:
    with pytest.raises(ValueError, match="whole blocks of 16"):
        quantize_channels(torch.randn(1, 1, 20, 64), 2, 16)
    with pytest.raises(ValueError, match="must divide head_dim"):
        quantize_channels(torch.randn(1, 1, 64, 48), 2, 32)


def test_quantize_store_reference_writes_whole_blocks_in_place() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 32, 64, generator=gen)
    fields = (torch.zeros(2, 2, 64, 16, dtype=torch.uint8), torch.zeros(2, 2, 64, 4, dtype=torch.float16),
              torch.zeros(2, 2, 64, 4, dtype=torch.float16))
    table = torch.arange(2, dtype=torch.int32)[:, None]
    quantize_store_reference(x, *fields, table, torch.tensor([16, 32], dtype=torch.int32), 2, None, token_block=16)
    codes, scale, zero = quantize_channels(x, 2, 16)
    for row, start in ((0, 16), (1, 32)):
        for got, want in zip(fields, (codes, scale, zero)):
            assert torch.equal(got[row, :, start : start + 32], want[row])
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_store_reference(x, *fields, table, torch.tensor([8, 0], dtype=torch.int32), 2, None, token_block=16)


def _channel_store(k_bits: int, v_bits: int, block: int, length: int, batch: int = 2, heads: int = 2,
                   kv_start=0) -> tuple[KVStore, torch.Tensor, torch.Tensor]:
    """A contiguous store of per-channel keys and per-token values, with the float64 K, V it decodes to."""
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    k = torch.randn(batch, heads, length, 64, generator=gen) * torch.linspace(0.2, 4.0, 64)
    v = torch.randn(batch, heads, length, 64, generator=gen)
    kc, ks, kz = quantize_channels(k, k_bits, block)
    vc, vs, vz = quantize(v, v_bits, 32)
    store = KVStore(k=kc, v=vc, block_table=torch.arange(batch, dtype=torch.int32)[:, None], kv_end=length,
                    kv_start=kv_start, k_bits=k_bits, v_bits=v_bits, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz,
                    v_group=32, k_block=block)
    keys = dequantize_channels(kc, ks, kz, k_bits, block, 64).double()
    return store, keys, dequantize(vc, vs, vz, v_bits, 32, 64).double()


def _dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int], scale: float):
    """float64 attention of q (B, Hq, Q, D) over every token from each row's start (GQA by repeat)."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    logits = torch.einsum("bhqd,bhtd->bhqt", q.double() * scale, keys)
    for row, start in enumerate(starts):
        logits[row, :, :, :start] = -math.inf
    return torch.einsum("bhqt,bhtd->bhqd", logits.softmax(-1), values), logits.logsumexp(-1)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096])  # every block at once / one block per conversion
@pytest.mark.parametrize("k_bits,v_bits", [(8, 4), (4, 2), (2, 2)])
def test_twins_attend_per_channel_keys_like_dense(k_bits: int, v_bits: int, chunk_bytes: int, monkeypatch) -> None:
    import kvpress.kernels.reference as reference

    monkeypatch.setattr(reference, "CACHE_CHUNK_BYTES", chunk_bytes)
    starts = [0, 5]
    store, keys, values = _channel_store(k_bits, v_bits, 16, 48, kv_start=torch.tensor(starts))
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 64, generator=gen)
    want, want_lse = _dense(q, keys, values, starts, 0.125)
    for fn in (extend_attention_multi_reference, extend_attention_multi_plain):
        out, lse = fn(q, (store,), 0.125)
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)
    for fn in (decode_attention_multi_reference, decode_attention_multi_plain):
        out, lse = fn(q[:, :, 0], (store,), 0.125)
        torch.testing.assert_close(out.double(), want[:, :, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse.double(), want_lse[:, :, 0], atol=1e-4, rtol=1e-4)


def test_per_channel_store_must_be_contiguous() -> None:
    store, _, _ = _channel_store(2, 2, 16, 32)
    paged = KVStore(**{**{f: getattr(store, f) for f in store.__slots__}, "block_table": torch.zeros(2, 2,
                                                                                                    dtype=torch.int32)})
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention_multi_reference(torch.randn(2, 4, 64), (paged,), 0.125)


def test_spec_grammar_defaults_and_fit() -> None:
    spec = QuantSpec.parse("int2-int2")
    assert spec.k_block == 64 and str(spec) == "int2-int2:kc64:g64:r128:s4"
    assert QuantSpec.parse(str(spec)) == spec
    assert QuantSpec.parse("int4-int2").k_block is None and QuantSpec.parse("int8-int4:kc32").k_block == 32
    assert QuantSpec.parse("int2-int2:kcnone").k_block is None
    assert QuantSpec.parse("int2-int2:kg16").k_block is None  # key groups asked for: per token, not a silent drop
    with pytest.raises(ValueError, match="not both"):
        QuantSpec.parse("int2-int2:kc64:kg16")
    assert QuantSpec.parse("int2-int2").fit(96).k_block == 32  # a default block shrinks to divide head_dim
    with pytest.raises(ValueError, match="nearest valid spec is 'int2-int2:kc32"):
        QuantSpec.parse("int2-int2:kc64").fit(96)
    assert QuantSpec.parse("int2-int2").bytes_per_token_head(64) == 16 + 4 + 16 + 4
    assert QuantSpec.parse("int2-int2:kc16").bytes_per_token_head(64) == 16 + 16 + 16 + 4


@pytest.mark.parametrize("press,paged", [("snapkv:0.5:budget=adaptive", False), ("h2o:0.5:max_tokens=64", False),
                                         (None, True)])
def test_storage_that_moves_single_tokens_takes_per_token_keys(press, paged) -> None:
    """Per-head budgets, H2O's decode-time eviction and prefix pages move tokens one at a time: a default block
    falls back to per-token keys, an explicit one is refused naming the spec to use."""
    assert resolve_config(press=press, quant="int2-int2", paged=paged).quant.k_block is None
    with pytest.raises(ValueError, match="int2-int2:kgnone:kcnone"):
        resolve_config(press=press, quant="int2-int2:kc64", paged=paged)
    assert resolve_config(press="snapkv:0.5", quant="int2-int2:kc64").quant.k_block == 64  # prompt-time eviction


def _run(model, spec, ids: torch.Tensor, steps: int, chunk: int | None = None, press=None, block: int | None = None):
    """Prefill (optionally in chunks) then decode `steps` tokens teacher-forced: log-probs, cache. With `block`,
    check after every step that the middle holds whole blocks and the window at most residual (4) + block."""
    cache = kvpress.KVPressCache(model.config, quant=spec, press=press)
    prompt = ids[:, : ids.shape[1] - steps]
    with torch.no_grad():
        bounds = range(0, prompt.shape[1], chunk or prompt.shape[1])
        for start in bounds:
            out = model(input_ids=prompt[:, start : start + (chunk or prompt.shape[1])], **cache_kwargs(model, cache))
        logits = [out.logits[:, -1]]
        for i in range(prompt.shape[1], ids.shape[1]):
            logits.append(model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache)).logits[:, -1])
            layer = cache.layers[0].kv
            assert block is None or (layer.main.length % block == 0 and layer.window.length <= 4 + block)
    return torch.log_softmax(torch.cat(logits).float(), -1), cache


@pytest.mark.parametrize("chunk", [None, 7])
def test_cache_writes_whole_blocks_and_stays_close_to_full(chunk) -> None:
    model = kvpress.wrap(head_dim_model(64))
    ids = torch.randint(1, 100, (1, 90), generator=torch.Generator().manual_seed(5))
    got, cache = _run(model, "int2-int2:kc16:r4:s2", ids, 30, chunk, block=16)
    layer = cache.layers[0].kv
    assert layer.main.length == 80 and layer.length == 90  # 2 sinks, 80 in whole blocks, 8 in the window
    full, _ = _run(model, None, ids, 30, chunk)
    per_token, _ = _run(model, "int2-int2:kcnone:r4:s2", ids, 30, chunk)
    kl = float((full.exp() * (full - got)).sum(-1).mean())
    assert kl < 0.05
    assert cache.layers[0].kv.main.store.nbytes() == 52 * cache.layers[0].kv.main.store.capacity
    assert per_token.shape == got.shape


def test_press_keeps_whole_blocks_re_encoded() -> None:
    model = kvpress.wrap(head_dim_model(64))
    ids = torch.randint(1, 100, (1, 100), generator=torch.Generator().manual_seed(6))
    got, cache = _run(model, "int2-int2:kc16:r4:s2", ids, 10, press="snapkv:0.5", block=16)
    full, full_cache = _run(model, None, ids, 10, press="snapkv:0.5")
    assert cache.layers[0].kv.length == full_cache.layers[0].kv.length < 100  # the press kept as many tokens
    assert float((full.exp() * (full - got)).sum(-1).mean()) < 0.05
