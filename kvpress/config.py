"""Parse what a user types (objects or strings such as "snapkv:0.5", "int8-int4", "true") into one KVConfig."""
from __future__ import annotations

from dataclasses import dataclass, replace
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


def check_kernel_config(head_dim: int, quant: Any = None, device: Any = None) -> None:
    """Refuse now, not at the first kernel call after the prefill, a head_dim or quantization the Triton kernels
    cannot take (kernels/shapes.py: head_dim above 256, groups across the tile's halves / 2-bit quarters), when the
    cache will run them: the kernel backend for `device` is Triton (CUDA, or Triton forced). `device` None (a
    KVPressCache built from a config alone): CUDA when there is one."""
    import torch

    from .kernels import kernel_backend
    from .kernels.shapes import check_kernel_shapes

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if kernel_backend(torch.device(device)) != "triton":
        return
    codec = quant.build_codec() if quant is not None else None
    fields = [] if codec is None else [("k", codec.k_bits, codec.k_group), ("v", codec.v_bits, codec.v_group)]
    try:
        check_kernel_shapes(head_dim, fields)
    except ValueError as err:
        try:  # the groups QuantSpec.fit would pick (they fit the kernels), when the head_dim itself is not the issue
            nearest = replace(quant, adapt_groups=True).fit(head_dim)
            check_kernel_shapes(head_dim, [("k", nearest.k_bits, nearest.k_group_size),
                                           ("v", nearest.v_bits, nearest.group_size)])
        except (ValueError, TypeError):
            raise err from None
        raise ValueError(f"{err}; the nearest spec they take is {str(nearest)!r}") from None


def single_token_storage(press: Any, paged: bool) -> str | None:
    """Why this cache's storage moves tokens one at a time (so quantized keys must be per token, not in per-channel
    blocks), or None: per-head budgets, decode-time eviction from the middle (H2O's max_tokens), prefix pages."""
    if paged:
        return "prefix sharing (paged=True) stores tokens in 16-token pages"
    if press is None:
        return None
    if press.per_head_budgets:
        return f"budget={press.budget} stores each head's tokens at its own length"
    if press.needs_attention_mass and press.max_tokens is not None and press.every is None:
        return f"max_tokens={press.max_tokens} evicts single tokens from the quantized middle while decoding"
    return None


def resolve_config(press: Any = None, quant: Any = None, paged: Any = False, head_dim: int | None = None,
                   device: Any = None) -> KVConfig:
    """Validate and normalise the three parts; raises ValueError before any work starts. With `head_dim`, the
    quantization is fitted to it (QuantSpec.fit: default groups adapt, explicit ones that cannot fit raise) and the
    shapes are checked against the kernels that will run on `device` (check_kernel_config)."""
    if isinstance(press, str) and press.strip().lower() in _FALSE:
        press = None
    if isinstance(quant, str) and quant.strip().lower() in _FALSE:
        quant = None
    if press is not None:
        from .presses.registry import parse_press

        press = parse_press(press)
    if quant is not None:
        from .quant.spec import QuantSpec

        paged = parse_bool(paged, "paged")
        quant = QuantSpec.parse(quant).for_storage(single_token_storage(press, paged))
        if head_dim is not None:
            quant = quant.fit(head_dim)
    paged = parse_bool(paged, "paged")
    if head_dim is not None:
        check_kernel_config(head_dim, quant, device)
    return KVConfig(press=press, quant=quant, paged=paged)
