"""KVCodec tests: the affine and full-precision codecs' fields, in-place stores, byte counts, and the registry that
maps a spec string to a codec (a new codec plugs into storage without touching it)."""
from dataclasses import dataclass

import pytest
import torch

from kvpress.kernels.affine import dequantize, quantize
from kvpress.quant import CODECS, AffineCodec, FullPrecisionCodec, QuantSpec, codec_class, register_codec
from kvpress.segments import Segment, SegmentedKV


def _tokens(seed: int, shape=(2, 3, 5, 64), dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype), torch.randn(*shape, generator=gen).to(dtype) * 3


def _nbytes_per_token(fields: dict[str, torch.Tensor]) -> float:
    tokens = next(iter(fields.values())).shape[:3].numel()
    return sum(t.numel() * t.element_size() for t in fields.values()) / tokens


@pytest.mark.parametrize("k_bits, v_bits, k_group, v_group", [(8, 4, None, 32), (4, 8, 16, None), (4, 4, 32, 32)])
def test_affine_codec_fields_are_the_per_group_codes(k_bits, v_bits, k_group, v_group):
    codec = AffineCodec(k_bits, v_bits, k_group, v_group)
    k, v = _tokens(k_bits + v_bits)
    fields = codec.encode(k, v)
    assert tuple(fields) == codec.field_names == ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
    for name, x, bits, group in (("k", k, k_bits, k_group), ("v", v, v_bits, v_group)):
        codes, scale, zero = quantize(x, bits, group)
        assert torch.equal(fields[name], codes)
        assert torch.equal(fields[f"{name}_scale"], scale) and torch.equal(fields[f"{name}_zero"], zero)
    k_out, v_out = codec.decode(fields, 64, torch.bfloat16)
    assert torch.equal(k_out, dequantize(fields["k"], fields["k_scale"], fields["k_zero"], k_bits, k_group, 64,
                                         torch.bfloat16))
    assert v_out.dtype == torch.bfloat16 and v_out.shape == v.shape
    assert codec.bytes_per_token(64) == _nbytes_per_token(fields)
    assert codec.group_sizes(64) == (k_group or 64, v_group or 64)
    assert codec.quantized and not codec.passthrough


def test_full_precision_codec_narrows_only_fp32():
    codec = FullPrecisionCodec(torch.float16)
    k, v = _tokens(1)
    fields = codec.encode(k, v)
    assert tuple(fields) == codec.field_names == ("k", "v")
    assert fields["k"].dtype == torch.float16 and torch.equal(fields["v"], v.half())
    assert codec.bytes_per_token(64, torch.float32) == _nbytes_per_token(fields) == 2 * 64 * 2
    kb, vb = _tokens(1, dtype=torch.bfloat16)
    assert codec.encode(kb, vb)["k"].dtype == torch.bfloat16  # 16-bit inputs are kept as they are
    assert FullPrecisionCodec().encode(k, v)["k"].dtype == torch.float32
    assert FullPrecisionCodec().bytes_per_token(64, torch.float32) == 2 * 64 * 4
    assert codec.decode(fields, 64, torch.float32) == (fields["k"], fields["v"])
    assert (codec.k_bits, codec.v_bits, codec.group_sizes(64)) == (16, 16, (64, 64))
    assert not codec.quantized and codec.passthrough


@pytest.mark.parametrize("codec", [AffineCodec(8, 4, None, 32), FullPrecisionCodec(torch.float16)])
def test_store_writes_the_encoded_fields_at_their_pages(codec):
    batch, heads, n_tokens, head_dim, page_size = 2, 3, 5, 64, 4
    k, v = _tokens(7, (batch, heads, n_tokens, head_dim))
    encoded = codec.encode(k, v)
    pool = {name: torch.zeros(7, heads, page_size, *t.shape[3:], dtype=t.dtype) for name, t in encoded.items()}
    table = torch.tensor([[5, 2, 0], [1, 6, 3]], dtype=torch.int32)
    dst_start = torch.tensor([2, 6], dtype=torch.int32)  # ragged starts crossing page edges
    codec.store(k, v, pool, table, dst_start)
    written = torch.zeros(7, page_size, dtype=torch.bool)
    for b in range(batch):
        t = torch.arange(int(dst_start[b]), int(dst_start[b]) + n_tokens)
        pages, slots = table[b].long()[t // page_size], t % page_size
        written[pages, slots] = True
        for name, t_enc in encoded.items():
            assert torch.equal(pool[name][pages, :, slots].transpose(0, 1), t_enc[b])
    for t in pool.values():
        assert not t.transpose(1, 2)[~written].any()  # nothing else was written


def test_segment_layout_comes_from_its_codec():
    seg = Segment(AffineCodec(4, 8, 16, None))
    assert (seg.k_bits, seg.v_bits, seg.k_group, seg.v_group, seg.quantized) == (4, 8, 16, None, True)
    plain = Segment()
    assert isinstance(plain.codec, FullPrecisionCodec)
    assert (plain.k_bits, plain.v_bits, plain.k_group, plain.v_group, plain.quantized) == (16, 16, None, None, False)
    kv = SegmentedKV(QuantSpec.parse("int8-int4:g16:r4:s2"))
    assert kv.main.codec == AffineCodec(8, 4, None, 16)
    assert kv.sink.codec == kv.window.codec == FullPrecisionCodec(torch.float16)


def test_spec_bytes_come_from_the_codec():
    for text in ("int8-int4", "int4:g32:kg32", "int8:gnone"):
        spec = QuantSpec.parse(text)
        assert spec.bytes_per_token_head(64) == spec.build_codec().bytes_per_token(64)


@dataclass(frozen=True)
class _RecordingCodec(AffineCodec):
    """A registered codec defined outside kvpress/quant: affine bytes, counting its in-place stores."""

    def store(self, k, v, fields, block_table, dst_start):
        STORES.append(k.shape[2])
        super().store(k, v, fields, block_table, dst_start)


STORES: list[int] = []


def test_a_registered_codec_is_reachable_from_a_spec_string_and_used_by_storage(monkeypatch):
    monkeypatch.setitem(CODECS, "recording", _RecordingCodec)  # what register_codec does, undone after the test
    spec = QuantSpec.parse("recording-int8-int4:g16:r2:s1")
    assert spec.codec == "recording" and QuantSpec.parse(str(spec)) == spec
    assert str(spec).startswith("recording-int8-int4")
    assert spec.build_codec() == _RecordingCodec(8, 4, None, 16)
    kv = SegmentedKV(spec)
    k, v = _tokens(3, (1, 2, 6, 32))
    STORES.clear()
    kv.append(k, v)  # prefill: 1 sink, 3 encoded into the middle, 2 in the window
    for i in range(20):  # decode: the window flushes a block through the codec's in-place store
        kt, vt = _tokens(10 + i, (1, 2, 1, 32))
        kv.append(kt, vt)
    assert STORES == [17]  # 16 decode tokens overshoot the window of 2, the 17th flushes 17 at once
    assert kv.length == 26 and kv.main.length == 20
    k_all, v_all = kv.dequantized(32, torch.float32)
    assert k_all.shape == (1, 2, 26, 32) and torch.allclose(k_all[:, :, :4], k[:, :, :4], atol=0.05)


def test_registry_rejects_unknown_names_and_bad_codecs():
    assert codec_class("affine") is AffineCodec
    with pytest.raises(ValueError, match="registered"):
        codec_class("nope")
    with pytest.raises(ValueError, match="int8-int4"):
        QuantSpec.parse("nope-int8")
    with pytest.raises(ValueError, match="codec"):
        QuantSpec(codec="nope")
    with pytest.raises(ValueError, match="lowercase"):
        register_codec("int4x", AffineCodec)  # would be read as bits in a spec string
    with pytest.raises(ValueError, match="KVCodec"):
        register_codec("plain", dict)
