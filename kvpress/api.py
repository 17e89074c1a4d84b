"""One line to turn compression on: `model = kvpress.wrap(model, press=..., quant=..., paged=...)`.

`wrap` switches the model to the registered "kvpress" attention and makes every later `model.generate(...)` build a
fresh KVPressCache with the configuration (unless the caller passes its own, as `cache=` or `past_key_values=`). `unwrap` restores
the model exactly.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .attention import ATTENTION_NAME, register
from .cache import KVPressCache, check_text_config
from .config import KVConfig, head_dim_of, resolve_config
from .hf_compat import cache_kwargs, pop_cache
from .paged_cache import PagedKVCache

_STATE_ATTR = "_kvpress_state"
_UNSET = object()


def check_model(model, kv_config: KVConfig | None = None) -> None:
    """Raise ValueError unless the model is a decoder-only model whose attention goes through AttentionInterface and
    that kvpress can run exactly with `kv_config` (layer types, attention settings, learned sinks; see
    cache.check_text_config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise ValueError(f"kvpress.wrap needs a transformers generative model, got {type(model).__name__}.")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; kvpress compresses decoder-only self-attention "
            "caches. Use a causal LM (e.g. Llama, Mistral, Qwen, Gemma3)."
        )
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so kvpress "
            "cannot attend over its compressed cache."
        )
    check_text_config(config.get_text_config(decoder=True), kv_config or KVConfig())
    sinks = [name for name, module in model.named_modules()
             if isinstance(getattr(module, "sinks", None), torch.nn.Parameter)]
    if sinks:
        raise ValueError(
            f"{type(model).__name__} has learned attention sinks (the `s_aux` attention argument, e.g. gpt-oss; "
            f"{sinks[0]}.sinks), which the kvpress attention does not implement; this model cannot be wrapped."
        )


def wrap(model, press: Any = None, quant: Any = None, paged: Any = False, prefix_cache: Any = None,
         prefix_namespace: str | None = None, **generate_defaults):
    """Make `model.generate` compress its KV cache as configured; returns the same model object.

    Strings are accepted: press="snapkv:0.5", quant="int8-int4", paged="true". Wrapping twice replaces the
    configuration. Extra keyword arguments become defaults of every generate call (e.g. prefill_chunk_size=1024).
    `prefix_namespace`: the key that tells this model's shared prefixes apart from other models' in a PrefixCache
    (default: a fingerprint of sampled weights, computed once here, so two fine-tunes of one base never share KV).
    """
    head_dim = head_dim_of(model.config.get_text_config(decoder=True)) if hasattr(model, "config") else None
    device = getattr(model, "device", None)  # the kernels' shape limits are checked for the device in use
    kv_config = resolve_config(press=press, quant=quant, paged=paged, head_dim=head_dim, device=device)
    check_model(model, kv_config)
    if prefix_cache is not None:
        from .paged.prefix_cache import PrefixCache
        from .prefix import check_prefix_config

        if not isinstance(prefix_cache, PrefixCache):
            raise ValueError(f"prefix_cache must be a kvpress.PrefixCache, got {type(prefix_cache).__name__}.")
        if not kv_config.paged:
            raise ValueError("prefix_cache needs paged storage: wrap(model, paged=True, prefix_cache=...).")
        check_prefix_config(model, kv_config, prefix_cache)
    register()
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = {"attn_implementation": model.config._attn_implementation, "had_generate": "generate" in vars(model)}
        state["original_generate"] = model.generate
        model.set_attn_implementation(ATTENTION_NAME)
    state["config"] = kv_config
    state["prefix_cache"] = prefix_cache
    state["prefix_namespace_key"] = prefix_namespace
    state["prefix_namespace"] = None  # computed on first use (prefix.prefix_namespace: weights fingerprint)
    if prefix_cache is not None:
        _prefix_namespace(model, state)
    state["generate_defaults"] = dict(generate_defaults)
    setattr(model, _STATE_ATTR, state)
    original = state["original_generate"]

    @functools.wraps(original)
    def generate(*args, press: Any = _UNSET, quant: Any = _UNSET, **kwargs):
        """`model.generate` with a fresh KVPressCache; per-call `press=` / `quant=` override the wrap config
        (this is also how a transformers text-generation pipeline passes them: `pipe(prompt, press="snapkv:0.5")`)."""
        for key, value in state["generate_defaults"].items():
            kwargs.setdefault(key, value)
        cfg = state["config"]
        given = pop_cache(kwargs)  # `cache=` (transformers >= 5.24) or `past_key_values=`
        if press is not _UNSET or quant is not _UNSET:
            if given is not None:
                raise ValueError("Pass press=/quant= or an explicit cache (past_key_values=), not both.")
            cfg = resolve_config(press=cfg.press if press is _UNSET else press,
                                 quant=cfg.quant if quant is _UNSET else quant, paged=cfg.paged, head_dim=head_dim,
                                 device=getattr(model, "device", None))
            check_text_config(model.config.get_text_config(decoder=True), cfg)
        if isinstance(given, PagedKVCache) or (given is None and state["prefix_cache"] is not None):
            from .prefix import generate_with_prefix_cache

            if args:
                kwargs["input_ids"] = args[0]
            prefix_cache = given.prefix_cache if given is not None else state["prefix_cache"]
            out, cache = generate_with_prefix_cache(model, original, prefix_cache, kv_config=cfg, cache=given,
                                                    namespace=_prefix_namespace(model, state), **kwargs)
            state["last_stats"] = cache.stats()
            return out
        cache = given
        if cache is None:
            cache = KVPressCache(model.config, press=cfg.press, quant=cfg.quant, paged=cfg.paged)
        if isinstance(cache, KVPressCache):  # the press may run the model when it compresses (prepare_compression)
            cache.attach_model(model)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(prompt, torch.Tensor):  # compress after the prompt, even if its last prefill chunk is 1 token
                cache.expect_prompt(prompt.shape[-1])
                cache.record_prompt_ids(prompt)  # a press that replays the context (KVzip) reads its ids
        out = original(*args, **cache_kwargs(model, cache), **kwargs)
        state["last_stats"] = cache.stats() if isinstance(cache, KVPressCache) else None
        return out

    model.generate = generate
    return model


def _prefix_namespace(model, state: dict) -> str:
    """The namespace of this model's KV in a PrefixCache, computed once per wrap (hashing sampled weights)."""
    if state["prefix_namespace"] is None:
        from .prefix import prefix_namespace

        state["prefix_namespace"] = prefix_namespace(model, key=state["prefix_namespace_key"])
    return state["prefix_namespace"]


def unwrap(model):
    """Undo `wrap`: restore the original attention implementation and generate method."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    model.set_attn_implementation(state["attn_implementation"])
    if state["had_generate"]:
        model.generate = state["original_generate"]
    else:
        del model.generate
    delattr(model, _STATE_ATTR)
    return model


def last_generate_stats(model) -> dict | None:
    """`cache.stats()` of the last generate call of a wrapped model (also when called through a pipeline)."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.get("last_stats")


def is_wrapped(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def wrapped_config(model):
    """The KVConfig a wrapped model generates with (None if not wrapped)."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state["config"]
