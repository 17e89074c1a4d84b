"""Codec registry: the name in a quantization spec ("affine" by default, e.g. "affine-int8-int4") -> KVCodec class.

A new codec is one file under kvpress/quant/ plus one line in CODECS below.
"""
from __future__ import annotations

import re

from .affine import AffineCodec
from .codec_base import KVCodec

DEFAULT_CODEC = "affine"
CODECS: dict[str, type[KVCodec]] = {
    "affine": AffineCodec,
}
_NAME = re.compile(r"^(?!int\d)[a-z][a-z0-9_]*$")  # a spec's head is "<name>-int<k>[-int<v>]"


def codec_class(name: str) -> type[KVCodec]:
    """The KVCodec class registered under `name`; ValueError listing the registered names otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r}; registered: {sorted(CODECS)}") from None


def register_codec(name: str, cls: type[KVCodec]) -> type[KVCodec]:
    """Register `cls` under `name` (lowercase, not starting with "int<digit>") for codecs defined outside kvpress."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"codec names are lowercase identifiers not starting with 'int<digit>', got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, KVCodec)):
        raise ValueError(f"a codec must be a KVCodec subclass, got {cls!r}")
    CODECS[name] = cls
    return cls
