"""Press registry and parser for command-line specs such as "snapkv:0.5" or "h2o:0.5:max_tokens=512,recent=64"."""
import dataclasses
import types
import typing

from kvpress.presses.base import BasePress
from kvpress.presses.expected import ExpectedAttentionPress
from kvpress.presses.h2o import H2OPress
from kvpress.presses.knorm import KnormPress
from kvpress.presses.kvzip import KVzipPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.snapkv import SnapKVPress
from kvpress.presses.streaming import StreamingLLMPress
from kvpress.presses.tova import TOVAPress

PRESSES: dict[str, type[BasePress]] = {
    "snapkv": SnapKVPress,
    "h2o": H2OPress,
    "streaming": StreamingLLMPress,
    "knorm": KnormPress,
    "random": RandomPress,
    "tova": TOVAPress,
    "kvzip": KVzipPress,
    "expected": ExpectedAttentionPress,
}

SPEC_FORMAT = ("NAME[:RATIO[:key=value,key=value]]  (e.g. 'snapkv:0.5', 'h2o:0.5:max_tokens=512,recent=64', "
               "'snapkv:0.5:layers=pyramid' or 'snapkv:0.5:max_tokens=2048,every=64')")


def _spec_error(spec: str, problem: str) -> ValueError:
    """A ValueError that names the problem, the accepted format and the known press names."""
    return ValueError(f"bad press spec {spec!r}: {problem}. Format: {SPEC_FORMAT}; known presses: {sorted(PRESSES)}")


def _convert(spec: str, field_name: str, text: str, hint: object) -> object:
    """Convert the text of one key=value pair to the field's annotated type (int, float, str, or one | None)."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if is_union else {hint}
    if type(None) in allowed and text.lower() == "none":
        return None
    if str in allowed:
        return text
    try:
        if int in allowed:
            return int(text)
        if float in allowed:
            return float(text)
    except ValueError:
        kind = "an integer" if int in allowed else "a number"
        raise _spec_error(spec, f"{field_name}={text!r} is not {kind}") from None
    raise _spec_error(spec, f"field {field_name} cannot be set from a spec string")


def parse_press(spec: str | BasePress | None) -> BasePress | None:
    """Build a press from a spec string (see SPEC_FORMAT); a BasePress or None is returned unchanged."""
    if spec is None or isinstance(spec, BasePress):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"press spec must be a string, a BasePress or None; got {type(spec).__name__}")
    parts = [part.strip() for part in spec.strip().split(":")]
    if len(parts) > 3:
        raise _spec_error(spec, "too many ':'-separated parts")
    name = parts[0].lower()
    if name not in PRESSES:
        raise _spec_error(spec, f"unknown press name {parts[0]!r}")
    press_class = PRESSES[name]
    kwargs: dict[str, object] = {}
    if len(parts) > 1 and parts[1]:
        try:
            kwargs["compression_ratio"] = float(parts[1])
        except ValueError:
            raise _spec_error(spec, f"compression ratio {parts[1]!r} is not a number") from None
    if len(parts) > 2 and parts[2]:
        hints = typing.get_type_hints(press_class)
        field_names = [field.name for field in dataclasses.fields(press_class)]
        for pair in parts[2].split(","):
            key, sep, text = (piece.strip() for piece in pair.partition("="))
            if not sep or not key or not text:
                raise _spec_error(spec, f"extra field {pair.strip()!r} is not key=value")
            if key not in field_names:
                raise _spec_error(spec, f"{press_class.__name__} has no field {key!r} (fields: {field_names})")
            if key in kwargs:
                raise _spec_error(spec, f"field {key!r} is given twice")
            kwargs[key] = _convert(spec, key, text, hints[key])
    return press_class(**kwargs)
