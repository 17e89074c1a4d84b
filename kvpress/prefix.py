"""Prefix sharing across generate calls: `kvpress.wrap(model, paged=True, prefix_cache=kvpress.PrefixCache(...))`.

For each row, the longest cached page-aligned prefix of its prompt is read in place from the PrefixCache's pages
(one physical copy shared by every request, locked while in use); only the rest of the prompt is computed, row by
row, with the extend path. The rows are then assembled into one batched cache (private tokens right-aligned, left
slots masked) and `generate` decodes as usual. Afterwards the prompt and generated tokens are inserted.

Rule for compression and sharing: shared pages are immutable, full-precision KV exactly as computed; a request may
only add private tokens after them. Presses and quantization are therefore rejected together with a prefix cache in
this version (clear error) rather than silently mixing compressed and shared KV.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from .cache import KVPressCache, KVPressLayer
from .paged.prefix_cache import PrefixCache, PrefixHit
from .segments import SharedPrefix


def namespace(model) -> str:
    """KV made under different models or dtypes never mixes."""
    cfg = model.config
    return f"{cfg._name_or_path}|{cfg.model_type}|{model.dtype}|layers={cfg.num_hidden_layers}|fp"


def check_prefix_config(model, kv_config) -> None:
    if kv_config.press is not None or kv_config.quant is not None:
        raise ValueError("prefix_cache shares full-precision pages; combine it with press=None and quant=None.")
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("prefix_cache does not support sliding-window layers yet (e.g. Gemma3, Mistral).")


def generate_with_prefix_cache(model, generate_fn: Callable, prefix_cache: PrefixCache, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Run `generate_fn` (the model's original generate) reusing and then extending `prefix_cache`.

    Returns (generate output, the batched KVPressCache used; its stats() count the private tokens and the
    per-request page tables, while the shared pages are counted once by prefix_cache.stats())."""
    batch, width = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lengths = mask.sum(dim=1).tolist()
    pads = [width - n for n in lengths]
    if not all(bool(mask[b, pads[b]:].all()) for b in range(batch)):
        raise ValueError("prefix_cache needs left-padded inputs (tokenizer.padding_side = 'left').")
    ns = namespace(model)
    rows = [input_ids[b, pads[b]:].tolist() for b in range(batch)]
    hits = [prefix_cache.match(ns, row, limit=len(row) - 1) for row in rows]
    try:
        row_caches = [_prefill_row(model, prefix_cache, row, hit) for row, hit in zip(rows, hits)]
        cache = _assemble(model, prefix_cache, row_caches, hits, pads, width)
        out = generate_fn(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        _insert(model, prefix_cache, ns, cache, hits, sequences, pads, width, kwargs)
    finally:
        for hit in hits:
            prefix_cache.release(hit)
    return out, cache


def _attach_prefix(layer: KVPressLayer, prefix_cache: PrefixCache, layer_idx: int, tables, ends) -> None:
    pool = prefix_cache.pool
    fields = pool.layers[layer_idx]
    layer.prefix = SharedPrefix(fields["k"], fields["v"], tables, ends)
    layer.dtype, layer.device, layer.head_dim = fields["k"].dtype, fields["k"].device, fields["k"].shape[-1]
    layer.is_initialized = True


def _prefill_row(model, prefix_cache: PrefixCache, row: list[int], hit: PrefixHit) -> KVPressCache:
    """Batch-1 cache of one row: the matched prefix in place, the rest of the prompt (but its last token) computed."""
    cache = KVPressCache(model.config)
    device = model.device
    if hit.n_tokens:
        table = torch.tensor([hit.pages], dtype=torch.int32, device=device)
        ends = torch.tensor([hit.n_tokens], dtype=torch.int32, device=device)
        for idx, layer in enumerate(cache.layers):
            _attach_prefix(layer, prefix_cache, idx, table, ends)
            layer.logical_length = hit.n_tokens
    rest = row[hit.n_tokens : -1]
    if rest:
        with torch.inference_mode():
            model(input_ids=torch.tensor([rest], device=device), past_key_values=cache, use_cache=True)
    return cache


def _assemble(model, prefix_cache, row_caches, hits, pads, width) -> KVPressCache:
    """One batched cache: private tokens right-aligned per row (left slots masked), shared prefixes in place."""
    cache = KVPressCache(model.config)
    device = model.device
    batch = len(row_caches)
    n_pages = max((len(h.pages) for h in hits), default=0)
    tables = torch.zeros(batch, max(n_pages, 1), dtype=torch.int32, device=device)
    for b, hit in enumerate(hits):
        if hit.pages:
            tables[b, : len(hit.pages)] = torch.tensor(hit.pages, dtype=torch.int32, device=device)
    ends = torch.tensor([h.n_tokens for h in hits], dtype=torch.int32, device=device)
    for idx, layer in enumerate(cache.layers):
        parts = [rc.layers[idx].kv.main.store for rc in row_caches]
        longest = max(p.length for p in parts)
        if longest:
            like = next(p for p in parts if p.length)
            fields = {}
            for name in ("k", "v"):
                template = like.view(name)
                rows = [torch.nn.functional.pad(p.view(name), (0, 0, longest - p.length, 0)) if p.length
                        else template.new_zeros(1, template.shape[1], longest, template.shape[3]) for p in parts]
                fields[name] = torch.cat(rows, dim=0)
            layer.kv.main.store.append(fields)
            layer.dtype, layer.device, layer.head_dim = fields["k"].dtype, fields["k"].device, fields["k"].shape[-1]
            layer.is_initialized = True
        layer.set_kv_start(torch.tensor([longest - p.length for p in parts], dtype=torch.int32, device=device))
        if bool((ends > 0).any()):
            _attach_prefix(layer, prefix_cache, idx, tables, ends)
        layer.logical_length = width - 1
        layer._refresh_views()
    return cache


def _insert(model, prefix_cache, ns, cache, hits, sequences, pads, width, kwargs) -> None:
    """Store each row's prompt + generated tokens (up to its end of sequence) for later calls."""
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    steps = sequences.shape[1] - width
    for b, hit in enumerate(hits):
        generated = sequences[b, width:].tolist()
        n_gen = next((i for i, t in enumerate(generated) if t in eos), len(generated))
        n_real = width - pads[b]
        n_store = min(n_real + n_gen, n_real + steps - 1)
        tokens = sequences[b, pads[b] : pads[b] + n_store].tolist()
        layers = []
        for idx, layer in enumerate(cache.layers):
            shared = prefix_cache.gather(hit, idx) if hit.n_tokens else None
            start = int(layer.kv_start[b]) if layer.kv_start is not None else 0
            private_n = n_store - hit.n_tokens
            per_field = {}
            for name in ("k", "v"):
                private = layer.kv.main.store.view(name)[b, :, start : start + private_n]
                per_field[name] = private if shared is None else torch.cat([shared[name], private], dim=1)
            layers.append(per_field)
        prefix_cache.store(ns, tokens, layers)


def generate_many(model, prompts: list, tokenizer=None, batch_size: int = 8, **generate_kwargs) -> list:
    """Generate for many prompts, batched in depth-first order of their shared prefixes (lexicographic order of the
    token ids: prompts sharing the longest prefixes run next to each other, so later batches hit the prefix cache).
    Returns the new tokens per prompt (decoded strings when a tokenizer is given) in the caller's order."""
    if not prompts:
        return []
    if tokenizer is not None and isinstance(prompts[0], str):
        token_lists = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    else:
        token_lists = [list(p) for p in prompts]
    pad_id = generate_kwargs.pop("pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(token_lists)), key=lambda i: token_lists[i])
    results: list = [None] * len(token_lists)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(token_lists[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(token_lists[i])
            ids[row, width - n :] = torch.tensor(token_lists[i])
            mask[row, width - n :] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             pad_token_id=pad_id, **generate_kwargs)
        out = out.sequences if hasattr(out, "sequences") else out
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            results[i] = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else new
    return results
