"""The transformers 5.x difference kvpress's own calls depend on: the name of the cache argument.

transformers 5.24 renamed the forward's / generate's `past_key_values` to `cache` (the old name warns, and leaves
`forward` in 5.40); earlier 5.x releases only know `past_key_values`. Every call kvpress makes passes its cache
through `cache_kwargs(model, cache)`, decided once per model class from the forward's signature.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")  # the current name first, then the deprecated one


@functools.lru_cache(maxsize=None)
def _cache_name_of(model_class: type) -> str:
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # no introspectable forward: the name every 5.x release accepts
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword `model`'s forward and generate take their Cache under: "cache" where the installed
    transformers has it, else "past_key_values"."""
    return _cache_name_of(type(model))


def cache_kwargs(model, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to splat into `model(...)` / `model.generate(...)` without a deprecation warning."""
    return {cache_kwarg(model): cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the caller's cache from generate/forward kwargs, under either name (None when absent); both at once
    is ambiguous and refused."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("Pass the cache as `cache=` or `past_key_values=`, not both.")
    values = [kwargs.pop(name, None) for name in CACHE_NAMES]
    return next((v for v in values if v is not None), None)


def layer_types_and_kwargs(text_config) -> tuple[list[str], list[dict[str, Any]]]:
    """Per decoder layer: its attention type ("full_attention", "sliding_attention", ...) and cache kwargs
    (`sliding_window`), as transformers' `get_layer_types_and_kwargs` gives them; releases before it existed
    derive them the way their DynamicCache does (`layer_types`, else one window for every layer)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        pass
    else:
        return get_layer_types_and_kwargs(text_config)
    window = getattr(text_config, "sliding_window", None) or getattr(text_config, "attention_chunk_size", None)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * text_config.num_hidden_layers
    types = list(types)
    if getattr(text_config, "num_kv_shared_layers", None):
        types = types[: -text_config.num_kv_shared_layers]
    kwargs = [{"sliding_window": window} if t in ("sliding_attention", "chunked_attention") else {} for t in types]
    return types, kwargs
