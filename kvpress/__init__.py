"""kvpress: long-context KV-cache compression for Hugging Face transformers.

`model = kvpress.wrap(model, press="snapkv:0.5", quant="int8-int4")` and every `model.generate` compresses.
Importing the package registers the "kvpress" attention function with transformers (explicit, idempotent).
"""
from .api import check_model, is_wrapped, unwrap, wrap
from .attention import register as _register_attention
from .cache import KVPressCache, KVPressLayer
from .config import KVConfig, resolve_config
from .default_model import load_default_model, load_model

_register_attention()

__all__ = [
    "KVConfig",
    "KVPressCache",
    "KVPressLayer",
    "check_model",
    "is_wrapped",
    "load_default_model",
    "load_model",
    "resolve_config",
    "unwrap",
    "wrap",
]
