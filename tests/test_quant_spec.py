"""QuantSpec tests: parsing forms and errors, validation, head_dim checks and byte accounting."""
import pytest

from kvpress.quant import QuantSpec


def test_defaults_and_passthrough():
    spec = QuantSpec()
    assert (spec.k_bits, spec.v_bits, spec.k_group_size, spec.group_size, spec.residual, spec.n_sink) == (8, 4, None, 32, 128, 4)
    assert QuantSpec.parse(None) == spec
    assert QuantSpec.parse(spec) is spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int8-int4", QuantSpec()),
        (" INT8-int4 ", QuantSpec()),
        ("int8", QuantSpec(k_bits=8, v_bits=8)),
        ("int4", QuantSpec(k_bits=4, v_bits=4)),
        ("int4-int8", QuantSpec(k_bits=4, v_bits=8)),
        ("int8-int4:g64:r16:s0", QuantSpec(group_size=64, residual=16, n_sink=0)),
        ("int8-int4:gnone:kg32", QuantSpec(group_size=None, k_group_size=32)),
    ],
)
def test_parse_forms(text, expected):
    assert QuantSpec.parse(text) == expected


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(4, 8, 16, None, 0, 1)])
def test_str_round_trips(spec):
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["fp8", "int3", "int4-int1", "int8-int16", "int8-int4:x3", "int8-int4:rnone", ""])
def test_parse_errors_list_accepted_forms(text):
    with pytest.raises(ValueError, match="int8-int4"):
        QuantSpec.parse(text)


def test_parse_rejects_invalid_option_value():
    with pytest.raises(ValueError, match="group_size must be a positive power of two"):
        QuantSpec.parse("int8-int4:g24")


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="accepted"):
        QuantSpec.parse(8)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"k_bits": 16}, "k_bits"), ({"v_bits": 3}, "v_bits"), ({"group_size": 24}, "group_size"),
     ({"k_group_size": 0}, "k_group_size"), ({"residual": -1}, "residual"), ({"n_sink": -2}, "n_sink")],
)
def test_field_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_check_head_dim():
    QuantSpec().check_head_dim(128)
    QuantSpec(group_size=64).check_head_dim(128)
    QuantSpec(group_size=128).check_head_dim(128)
    with pytest.raises(ValueError, match="head_dim/2"):
        QuantSpec(group_size=64).check_head_dim(96)
    with pytest.raises(ValueError, match="must divide head_dim"):
        QuantSpec(k_group_size=64).check_head_dim(96)
    with pytest.raises(ValueError, match="group_size must divide"):
        QuantSpec(k_bits=8, v_bits=8, group_size=256).check_head_dim(128)


def test_bytes_per_token_head():
    assert QuantSpec(group_size=None).bytes_per_token_head(128) == 200  # 128 + 64 + 2*2 + 2*2
    assert QuantSpec().bytes_per_token_head(128) == 128 + 4 + 64 + 4 * 4
    assert QuantSpec.parse("int4:g32:kg32").bytes_per_token_head(64) == 32 + 32 + 2 * 4 * 2
    assert QuantSpec.parse("int8:gnone").bytes_per_token_head(64) == 2 * (64 + 4)
