"""Parse what a user types (objects or strings such as "snapkv:0.5", "int8-int4", "true") into one KVConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", "none", ""}


@dataclass(frozen=True)
class KVConfig:
    """The validated compression configuration shared by every layer of one cache."""

    press: Any = None
    quant: Any = None
    paged: bool = False


def parse_bool(value: Any, name: str) -> bool:
    """Accept bools and the usual strings; anything else is an error naming the option."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use true or false.")


def head_dim_of(text_config) -> int:
    """The attention head size of a decoder config (`head_dim`, else hidden_size / num_attention_heads)."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def resolve_config(press: Any = None, quant: Any = None, paged: Any = False, head_dim: int | None = None) -> KVConfig:
    """Validate and normalise the three parts; raises ValueError before any work starts. With `head_dim`, the
    quantization is fitted to it (QuantSpec.fit: default groups adapt, explicit ones that cannot fit raise)."""
    if isinstance(press, str) and press.strip().lower() in _FALSE:
        press = None
    if isinstance(quant, str) and quant.strip().lower() in _FALSE:
        quant = None
    if press is not None:
        from .presses.registry import parse_press

        press = parse_press(press)
    if quant is not None:
        from .quant.spec import QuantSpec

        quant = QuantSpec.parse(quant)
        if head_dim is not None:
            quant = quant.fit(head_dim)
    paged = parse_bool(paged, "paged")
    return KVConfig(press=press, quant=quant, paged=paged)
