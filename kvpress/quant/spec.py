"""QuantSpec: which bit widths and groupings the KV cache uses, and how many tokens stay full precision.

Parsed from short strings such as "int8-int4" or "int8-int4:g32:r128:s4" (optionally "<codec>-int8-int4" for a codec
registered in kvpress/quant/registry.py) so configs and CLIs stay terse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..kernels.shapes import group_problem
from .codec_base import KVCodec
from .registry import CODECS, DEFAULT_CODEC, codec_class



def accepted_forms() -> str:
    """The spec strings QuantSpec.parse accepts (named in its errors), with the codecs registered now."""
    return (
        "'int8-int4' (8-bit keys, 4-bit values), 'int4-int8', 'int8-int8', 'int4-int4', 'int4-int2', 'int2-int2', "
        "'int8' (both 8-bit), 'int4' (both 4-bit), 'int2' (both 2-bit), optionally prefixed by a registered codec "
        "name and '-' "
        f"({', '.join(sorted(CODECS))}; default {DEFAULT_CODEC}), each optionally followed by ':'-separated options "
        "g<N>|gnone (value group size), kg<N>|kgnone (key group size), kc<N>|kcnone (keys per channel over blocks "
        "of N tokens, KIVI; none: per token), r<N> (residual tokens), s<N> (sink tokens), "
        "rotk|rotv|rotkv|rotnone (Hadamard-rotate keys / values before encoding), "
        "e.g. 'int8-int4:g32:r128:s4'"
    )

_BITS_PATTERN = re.compile(r"^(?:(?!int\d)([a-z][a-z0-9_]*)-)?int(\d+)(?:-int(\d+))?$")
_OPTION_PATTERN = re.compile(r"^(kg|kc|g|rot|r|s)(\d+|none|k|v|kv)$")
ROTATIONS = ("none", "k", "v", "kv")
_OPTION_FIELDS = {"kg": "k_group_size", "kc": "k_block", "g": "group_size", "r": "residual", "s": "n_sink",
                  "rot": "rotate"}


def default_rotation(k_bits: int, v_bits: int) -> str:
    """Hadamard rotation of keys and values ("kv") for specs with 2-bit codes, none otherwise: measured on the
    default model (eval/results/quant_rotation.md), rotating both halves the KL of int4-int2 and divides int2-int2's
    by six; 4- and 8-bit specs keep their unrotated layout unless asked (rotv / rotkv pay there too, less)."""
    return "kv" if min(k_bits, v_bits) <= 2 else "none"


def default_value_group(v_bits: int) -> int:
    """The value group a spec string gets without a g option: 32, or 64 for (rotated) 2-bit values - one group
    per head at head_dim 64, measured both smaller and closer to the full cache than g32 there (KL 0.0043 vs
    0.0058, top-1 98.0% vs 95.7%, eval/results/quant_lowbit_4texts.md)."""
    return 64 if v_bits <= 2 else 32


def default_key_block(k_bits: int) -> int | None:
    """Keys per channel over blocks of 64 tokens (KIVI) for 2-bit keys, per token otherwise: measured on the default
    model (eval/results/quant_per_channel_4k.md), per-channel 2-bit keys divide int2-int2's KL by about four at the
    same bytes, while 4-bit keys gain little and would lose prefix sharing and per-head budgets (which need
    per-token codes)."""
    return 64 if k_bits <= 2 else None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _fitting_group(head_dim: int, bits: int, group: int | None) -> int | None:
    """The largest power of two <= `group` that tiles head_dim for `bits`-bit codes (8-bit: divides head_dim, 4- and
    2-bit: head_dim/2) and that the Triton kernels read too (kernels/shapes.group_problem: within one half of the
    head, 2-bit within one quarter), else None (one group of head_dim); None stays None. Power-of-two head dims
    get the same groups either way; head_dim 96 gets g16 (int4, int8) and g8 (int2)."""
    if group is None or group == head_dim:
        return group
    span = head_dim // 2 if bits < 8 else head_dim
    size = group
    while size > 1 and (span % size or group_problem(head_dim, bits, size) is not None):
        size //= 2
    return size if size > 1 and span % size == 0 else None


def _fitting_block(head_dim: int, block: int | None) -> int | None:
    """The largest power of two <= `block` that divides head_dim (the slots of a block hold its channels' scales);
    None stays None."""
    if block is None:
        return None
    size = block
    while size > 2 and head_dim % size:
        size //= 2
    return size if head_dim % size == 0 else None


@dataclass(frozen=True)
class QuantSpec:
    """KV quantization settings: key/value bits, group sizes along head_dim (None = one group of D),
    `residual` most recent tokens and `n_sink` first tokens kept in full precision, the registered `codec`
    (kvpress/quant/registry.py) that encodes the middle with them, and which fields it Hadamard-rotates first
    (`rotate`: "none", "k", "v", "kv"; None = default_rotation(bits)).

    `adapt_groups` (not part of equality): the group sizes are defaults nobody asked for (a string without g/kg
    options, or None), so `fit(head_dim)` shrinks them to fit the model; explicit ones are checked, never changed.
    `adapt_rotation` (not part of equality): likewise for a default rotation (no rot option): `fit` drops it where the
    Hadamard transform does not exist (head_dim not a power of two, e.g. 80 or 96); an explicit one raises there.
    `k_block` (None = per token): keys quantized per channel over blocks of that many tokens (KIVI); a default one
    (adapt_block) shrinks in `fit` to divide head_dim, and `per_token_keys()` is the spec for stores that need
    per-token codes. `adapt_block` (not part of equality, kept by `fit`): the block is a default nobody asked for (no
    kc option), so `for_storage` may fall back to per-token keys where the storage needs them; an explicit one
    raises there."""

    k_bits: int = 8
    v_bits: int = 4
    k_group_size: int | None = None
    group_size: int | None = 32
    residual: int = 128
    n_sink: int = 4
    codec: str = DEFAULT_CODEC
    rotate: str | None = None
    k_block: int | None = None
    adapt_groups: bool = field(default=False, compare=False)
    adapt_block: bool = field(default=False, compare=False)
    adapt_rotation: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.rotate is None:  # frozen: the default is resolved once, here
            object.__setattr__(self, "rotate", default_rotation(self.k_bits, self.v_bits))
            object.__setattr__(self, "adapt_rotation", True)
        if self.rotate not in ROTATIONS:
            raise ValueError(f"QuantSpec.rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if self.k_block is not None and self.k_group_size is not None:
            raise ValueError(f"QuantSpec: keys are either per token in groups of k_group_size={self.k_group_size} "
                             f"(kg) or per channel over blocks of k_block={self.k_block} tokens (kc), not both")
        try:
            self.build_codec()  # the codec checks the bits (and anything else it needs)
        except ValueError as err:
            raise ValueError(f"QuantSpec: {err}") from None
        for name in ("k_group_size", "group_size", "k_block"):
            size = getattr(self, name)
            if size is None:
                continue
            if isinstance(size, bool) or not isinstance(size, int) or not _is_power_of_two(size):
                raise ValueError(f"QuantSpec.{name} must be a positive power of two or None, got {size!r}")
        for name in ("residual", "n_sink"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"QuantSpec.{name} must be an int >= 0, got {count!r}")

    def build_codec(self) -> KVCodec:
        """The codec that encodes the quantized middle: `codec`'s registered class built from this spec."""
        return codec_class(self.codec).from_spec(self)

    @classmethod
    def parse(cls, spec: str | QuantSpec | None) -> QuantSpec:
        """Build a QuantSpec from a string (see accepted_forms()), pass one through, or default for None."""
        if spec is None:
            return cls(adapt_groups=True)
        if isinstance(spec, QuantSpec):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"cannot parse a QuantSpec from {type(spec).__name__}; accepted: {accepted_forms()}")
        head, *options = spec.strip().lower().split(":")
        match = _BITS_PATTERN.match(head)
        if match is None:
            raise ValueError(f"unknown quantization spec {spec!r}; accepted: {accepted_forms()}")
        codec = match.group(1) or DEFAULT_CODEC
        k_bits = int(match.group(2))
        v_bits = int(match.group(3)) if match.group(3) else k_bits
        try:
            result = cls(k_bits=k_bits, v_bits=v_bits, group_size=default_value_group(v_bits), codec=codec,
                         k_block=default_key_block(k_bits), adapt_groups=True,
                         adapt_block=default_key_block(k_bits) is not None)
        except ValueError as err:
            raise ValueError(
                f"unsupported codec or bit width in {spec!r} ({err}); accepted: {accepted_forms()}"
            ) from None
        for option in options:
            opt = _OPTION_PATTERN.match(option.strip())
            if opt is None:
                raise ValueError(
                    f"unknown option {option!r} in quantization spec {spec!r}; accepted: {accepted_forms()}"
                )
            key, raw = opt.groups()
            if key == "rot":
                if raw not in ROTATIONS:
                    raise ValueError(f"option {option!r} must be rotk, rotv, rotkv or rotnone; accepted: "
                                     f"{accepted_forms()}")
                result = replace(result, rotate=raw, adapt_rotation=False)
                continue
            if not raw.isdigit() and raw != "none":
                raise ValueError(f"unknown option {option!r} in quantization spec {spec!r}; accepted: {accepted_forms()}")
            if raw == "none" and key not in ("g", "kg", "kc"):
                raise ValueError(f"option {option!r} needs a number; accepted: {accepted_forms()}")
            explicit = {"adapt_groups": False} if key in ("g", "kg") else {}
            if key == "kc":
                explicit = {"adapt_block": False}
            elif key == "kg" and result.adapt_block:  # key groups per token asked for: no default per-channel block
                explicit["k_block"], explicit["adapt_block"] = None, False
            result = replace(result, **{_OPTION_FIELDS[key]: None if raw == "none" else int(raw)}, **explicit)
        return result

    def __str__(self) -> str:
        """Canonical string form; QuantSpec.parse(str(spec)) == spec."""
        def size(n: int | None) -> str:
            return "none" if n is None else str(n)

        prefix = "" if self.codec == DEFAULT_CODEC else f"{self.codec}-"
        keys = f"kc{self.k_block}" if self.k_block is not None else f"kg{size(self.k_group_size)}"
        if self.k_block is None and default_key_block(self.k_bits) is not None:
            keys += ":kcnone"
        return (
            f"{prefix}int{self.k_bits}-int{self.v_bits}:{keys}:g{size(self.group_size)}"
            f":r{self.residual}:s{self.n_sink}"
            + ("" if self.rotate == default_rotation(self.k_bits, self.v_bits) else f":rot{self.rotate}")
        )

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if a group size does not fit head_dim (4-bit groups must divide D/2 or equal D)."""
        self.build_codec().check_head_dim(head_dim)

    def fit(self, head_dim: int) -> QuantSpec:
        """This spec for a model of `head_dim`: default groups (adapt_groups) and a default key block (adapt_block)
        shrink to the largest power of two that fits (one group if none does), so head_dim 64 and 128 keep the
        defaults; explicit ones that do not fit raise a ValueError naming the nearest valid spec string."""
        fitted = replace(self, k_group_size=_fitting_group(head_dim, self.k_bits, self.k_group_size),
                         group_size=_fitting_group(head_dim, self.v_bits, self.group_size), adapt_groups=False,
                         adapt_rotation=False, k_block=_fitting_block(head_dim, self.k_block),
                         adapt_block=self.adapt_block)
        if not _is_power_of_two(head_dim) and self.rotate != "none":  # no Hadamard transform of this size
            fitted = replace(fitted, rotate="none")
            if not self.adapt_rotation:
                raise ValueError(f"quantization spec {str(self)!r} rotates with a Hadamard transform, which needs a "
                                 f"power-of-two head_dim; this model's is {head_dim}. The nearest valid spec is "
                                 f"{str(fitted)!r} (or leave the rot option out to let kvpress pick).")
            self = replace(self, rotate="none", adapt_rotation=False)  # a default nobody asked for: dropped
        block = fitted.k_block if self.adapt_block else self.k_block  # an explicit kc is checked, never changed
        if self.adapt_groups:
            result = replace(fitted, k_block=block)
        else:
            result = replace(self, k_block=block, adapt_groups=False, adapt_rotation=False)
        try:
            result.check_head_dim(head_dim)
        except ValueError as err:
            raise ValueError(
                f"quantization spec {str(self)!r} does not fit this model's head_dim={head_dim}: {err}; the nearest "
                f"valid spec is {str(fitted)!r} (or leave the group sizes out to let kvpress pick them)"
            ) from None
        return result

    def for_storage(self, reason: str | None) -> QuantSpec:
        """This spec for a cache whose storage moves single tokens (`reason` says which setting does; None: none
        does): keys per channel fall back to per token when the block is a default, and raise when it was asked
        for (a block's tokens must stay together)."""
        if reason is None or self.k_block is None:
            return self
        if self.adapt_block:
            return self.per_token_keys()
        raise ValueError(f"quantization spec {str(self)!r} quantizes keys per channel over blocks of {self.k_block} "
                         f"tokens, which must stay together, but {reason}. Use "
                         f"{str(self.per_token_keys())!r} (keys per token) or leave the kc option out.")

    def per_token_keys(self) -> QuantSpec:
        """This spec with keys quantized per token (one group of head_dim) instead of per channel: for stores whose
        tokens are kept or moved one at a time (per-head budgets, decode-time eviction, shared prefix pages)."""
        return self if self.k_block is None else replace(self, k_block=None, k_group_size=None)

    def bytes_per_token_head(self, head_dim: int) -> int:
        """Bytes one quantized token uses per kv-head (the codec's count: codes plus scales and zeros)."""
        codec = self.build_codec()
        codec.check_head_dim(head_dim)
        return codec.bytes_per_token(head_dim)
