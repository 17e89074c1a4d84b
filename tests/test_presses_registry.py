"""Tests of the press registry and the spec-string parser."""
import pytest

from kvpress.presses import (PRESSES, ExpectedAttentionPress, H2OPress, KnormPress, KVzipPress, RandomPress,
                             SnapKVPress, StreamingLLMPress, TOVAPress, parse_press)


def test_registry_names() -> None:
    assert PRESSES == {
        "snapkv": SnapKVPress,
        "h2o": H2OPress,
        "streaming": StreamingLLMPress,
        "knorm": KnormPress,
        "random": RandomPress,
        "tova": TOVAPress,
        "kvzip": KVzipPress,
        "expected": ExpectedAttentionPress,
    }


def test_parse_forms() -> None:
    assert parse_press(None) is None
    press = KnormPress(compression_ratio=0.25)
    assert parse_press(press) is press
    assert parse_press("snapkv:0.5") == SnapKVPress(compression_ratio=0.5)
    assert parse_press(" SnapKV : 0.5 ") == SnapKVPress(compression_ratio=0.5)
    assert parse_press("knorm") == KnormPress()
    assert parse_press("h2o:0.5:max_tokens=512,recent=64") == H2OPress(0.5, max_tokens=512, recent=64)
    assert parse_press("h2o::max_tokens=none") == H2OPress()
    assert parse_press("snapkv:0.3:window_size=16, kernel_size=7") == SnapKVPress(0.3, window_size=16, kernel_size=7)
    assert parse_press("random:0.1:seed=3") == RandomPress(0.1, seed=3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope:0.5", "unknown press name"),
        ("snapkv:half", "not a number"),
        ("snapkv:0.5:window=3", "no field 'window'"),
        ("snapkv:0.5:window_size=3.5", "not an integer"),
        ("snapkv:0.5:window_size", "key=value"),
        ("snapkv:0.5:x=1:y", "too many"),
        ("h2o:0.5:compression_ratio=0.2", "twice"),
        ("snapkv:1.5", "compression_ratio"),
        ("h2o:0.5:max_tokens=8", "max_tokens"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_press(spec)


def test_parse_error_lists_names_and_format() -> None:
    with pytest.raises(ValueError) as error:
        parse_press("bogus")
    text = str(error.value)
    assert all(name in text for name in PRESSES) and "NAME[:RATIO" in text


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="press spec"):
        parse_press(0.5)  # type: ignore[arg-type]
