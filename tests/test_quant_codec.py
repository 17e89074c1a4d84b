"""Codec tests: per-element error bound, constant and outlier vectors, packing layout, input errors."""
import pytest
import torch

from kvpress.quant import dequantize, pack_int4, quantize, unpack_int4


def _error_bound(x: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """scale/2 per element plus a few float32 ulps of the magnitudes involved."""
    per_element = scale.float().repeat_interleave(group, dim=-1)
    return per_element / 2 + 4 * torch.finfo(torch.float32).eps * (x.abs() + per_element)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_round_trip_error_is_within_half_a_step(bits, group, magnitude):
    gen = torch.Generator().manual_seed(bits * 100 + (group or 0))
    x = (torch.randn(4, 3, 50, 128, generator=gen) + 4 * torch.randn(4, 3, 50, 1, generator=gen)) * magnitude
    q, scale, zero = quantize(x, bits, group)
    g = group or 128
    assert q.dtype == torch.uint8 and q.shape == (4, 3, 50, 128 if bits == 8 else 64)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (4, 3, 50, 128 // g)
    assert (scale > 0).all()
    out = dequantize(q, scale, zero, bits, group, 128)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert ((x - out).abs() <= _error_bound(x, scale, g)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_wastes_no_precision(bits):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    _, scale, _ = quantize(x, bits, 32)
    spread = x.view(64, 4, 32).amax(-1) - x.view(64, 4, 32).amin(-1)
    assert (scale.float() <= spread / (2**bits - 1) * 1.002).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_outputs(dtype):
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    q, scale, zero = quantize(x, 8, 32)
    out = dequantize(q, scale, zero, 8, 32, 64, dtype)
    assert out.dtype == dtype
    assert ((x.float() - out.float()).abs() <= scale.float().repeat_interleave(32, -1) / 2 + 1e-2 * x.float().abs() + 1e-3).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("value", [0.0, 0.5, -3.0, 1024.0])
def test_representable_constant_round_trips_exactly(bits, value):
    x = torch.full((3, 64), value)
    q, scale, zero = quantize(x, bits, None)
    assert (scale > 0).all()
    assert torch.equal(dequantize(q, scale, zero, bits, None, 64), x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("value", [0.1, -7.3e-3, 4321.123])
def test_unrepresentable_constant_round_trips_almost_exactly(bits, value):
    x = torch.full((2, 64), value)
    q, scale, zero = quantize(x, bits, 32)
    assert (scale > 0).all()
    err = (dequantize(q, scale, zero, bits, 32, 64) - x).abs()
    assert (err <= abs(value) * 2**-11).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_outlier_is_kept_and_isolated_by_groups(bits):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))
    x[:, 5] = 1000.0 * x.abs().max()
    q, scale, zero = quantize(x, bits, 32)
    out = dequantize(q, scale, zero, bits, 32, 128)
    assert ((x - out).abs() <= _error_bound(x, scale, 32)).all()
    assert ((x[:, 5] - out[:, 5]).abs() <= scale[:, 0].float() / 2 + 1e-3).all()
    # Groups without the outlier keep their fine resolution.
    assert (scale[:, 1:].float() < scale[:, :1].float() / 100).all()
    q_one, scale_one, zero_one = quantize(x, bits, None)
    out_one = dequantize(q_one, scale_one, zero_one, bits, None, 128)
    assert ((x - out_one).abs() <= _error_bound(x, scale_one, 128)).all()


def test_codes_stay_in_range():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 50
    q, _, _ = quantize(x, 4, 32)
    codes = unpack_int4(q)
    assert int(codes.max()) <= 15 and int(codes.max()) == 15 and int(codes.min()) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1e6])
def test_non_finite_or_out_of_range_input_raises(bad):
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize(x, 8, 32)
    quantize(x, 8, 32, check_finite=False)  # opt-out does not raise


def test_large_outlier_with_encodable_scale_and_zero_is_accepted():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    x[1, 3] = 1e6  # beyond fp16, but the group's scale (~3914) and zero still fit in fp16
    q, scale, zero = quantize(x, 8, 32)
    assert ((x - dequantize(q, scale, zero, 8, 32, 64)).abs() <= _error_bound(x, scale, 32)).all()


def test_group_and_bits_validation():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="divide head_dim/2"):
        quantize(x, 4, 32)  # 32 does not divide 48
    quantize(x, 4, 16)
    quantize(x, 4, 96)
    with pytest.raises(ValueError, match="must divide head_dim"):
        quantize(torch.randn(2, 128), 8, 48)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(x, 3, None)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, 64, dtype=torch.int32), 8, None)


def test_dequantize_shape_validation():
    q, scale, zero = quantize(torch.randn(3, 64), 4, 32)
    with pytest.raises(ValueError, match="last dim 64"):
        dequantize(q, scale, zero, 8, 32, 64)
    with pytest.raises(ValueError, match="scale and zero of shape"):
        dequantize(q, scale[:, :1], zero[:, :1], 4, 32, 64)


def test_pack_layout_is_split_halves():
    q = torch.arange(16, dtype=torch.uint8).repeat(2, 2)  # [2, 32]
    packed = pack_int4(q)
    assert packed.shape == (2, 16)
    for j in range(16):
        assert int(packed[0, j]) == int(q[0, j]) | (int(q[0, j + 16]) << 4)


@pytest.mark.parametrize("shape", [(2,), (5, 64), (2, 3, 7, 128)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    p = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(pack_int4(unpack_int4(p)), p)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_int4(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(3, 4))
