"""kvpress: long-context KV-cache compression for Hugging Face transformers.

`model = kvpress.wrap(model, press="snapkv:0.5", quant="int8-int4")` and every `model.generate` compresses.
Importing the package registers the "kvpress" attention function with transformers (explicit, idempotent).
"""
from .api import check_model, is_wrapped, last_generate_stats, unwrap, wrap
from .attention import register as _register_attention
from .cache import KVPressCache, KVPressLayer
from .config import KVConfig, resolve_config
from .named_caches import H2OCache, QuantizedKVCache, SnapKVCache
from .default_model import load_default_model, load_model
from .paged.prefix_cache import PrefixCache
from .paged_cache import PagedKVCache
from .batching import generate_many
from .pipeline import KVPressTextGenerationPipeline, register_pipeline as _register_pipeline
from .presses import (
    ExpectedAttentionPress,
    H2OPress,
    KnormPress,
    KVzipPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from .quant import QuantSpec

_register_attention()
_register_pipeline()

__all__ = [
    "ExpectedAttentionPress",
    "H2OCache",
    "KVzipPress",
    "H2OPress",
    "QuantizedKVCache",
    "SnapKVCache",
    "KVConfig",
    "KVPressTextGenerationPipeline",
    "KnormPress",
    "PagedKVCache",
    "PrefixCache",
    "QuantSpec",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "KVPressCache",
    "KVPressLayer",
    "check_model",
    "generate_many",
    "is_wrapped",
    "last_generate_stats",
    "load_default_model",
    "load_model",
    "resolve_config",
    "unwrap",
    "wrap",
]
