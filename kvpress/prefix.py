"""Prefix sharing across generate calls: `kvpress.wrap(model, paged=True, prefix_cache=kvpress.PrefixCache(...))`.

For each row, the longest cached page-aligned prefix of its prompt is read in place from the PrefixCache's pages
(one physical copy shared by every request, locked while in use); only the rest of the prompt is computed, row by
row, with the extend path. The rows are then assembled into one batched PagedKVCache and `generate` decodes as usual.

Rule for compression and sharing: shared pages are immutable and hold exact full-precision KV, whatever the
requests' press or quantization. An uncompressed request attends them in place (its cache holds only its private
tokens). A compressed request (press and/or quant) gets its own copy of the prefix: its prompt is held in full
precision until the prompt's last token has been attended, then quantized and pressed exactly as if the whole prompt
had been one prefill chunk (DeferredEncoding), so its outputs equal those without the prefix cache. Sharing then saves
the prefix's prefill compute; its memory is the request's own compressed cache. No request sees another's private KV.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from .cache import KVPressCache
from .config import KVConfig, head_dim_of
from .hf_compat import cache_kwargs, layer_types_and_kwargs
from .paged.prefix_cache import PrefixCache, PrefixHit
from .paged_cache import PagedKVCache, same_codes, shared_codes_spec
from .segments import SharedPrefix

POOL_CODE_NAMES = {"k": "k_codes", "v": "v_codes"}  # the pool's "k" / "v" hold full precision; other fields keep their name


FINGERPRINT_SAMPLES = 256  # elements sampled (evenly strided) from every parameter tensor


def prefix_namespace(model, key: str | None = None) -> str:
    """KV made under different models or dtypes never mixes (pages are full precision whatever press/quant).

    `key` tells the weights apart (default: `weights_fingerprint(model)`): two fine-tunes of one base model share
    name, architecture and dtype but not their KV."""
    cfg = model.config
    key = weights_fingerprint(model) if key is None else key
    return f"{cfg._name_or_path}|{cfg.model_type}|{model.dtype}|layers={cfg.num_hidden_layers}|fp|weights={key}"


def weights_fingerprint(model, samples: int = FINGERPRINT_SAMPLES) -> str:
    """A hash of every parameter's name, shape and `samples` evenly strided elements: cheap (a few hundred
    elements per tensor, whatever the model size) and different for any fine-tune that changes most elements of
    any tensor (full fine-tunes, merged LoRA). Parameters on the meta device count by name and shape only."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            if param.device.type == "meta" or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // samples)][:samples].contiguous()
            digest.update(sample.cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_prefix_config(model, kv_config: KVConfig, prefix_cache: PrefixCache | None = None) -> None:
    """Reject what prefix sharing cannot reproduce exactly, before any work starts."""
    if prefix_cache is not None:
        shared_codes_spec(prefix_cache, head_dim_of(model.config.get_text_config(decoder=True)))
    if kv_config.press is not None:
        kv_config.press.check_prefix_sharing()
    layer_types, _ = layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("prefix_cache does not support sliding-window layers yet (e.g. Gemma3, Mistral).")


def generate_with_prefix_cache(model, generate_fn: Callable, prefix_cache: PrefixCache, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor | None = None, kv_config: KVConfig | None = None,
                               cache: PagedKVCache | None = None, namespace: str | None = None, **kwargs: Any):
    """Run `generate_fn` (the model's original generate) reusing and then extending `prefix_cache`.

    `cache` (an empty PagedKVCache) or `kv_config` says how the request compresses; `namespace` is the model's key
    in the prefix cache (default: `prefix_namespace(model)`, which hashes sampled weights: pass it to avoid the cost).
    Returns (generate output, the PagedKVCache used: its stats() count the private tokens, and the shared pages it
    read, which prefix_cache.stats() counts once). Whatever raises, every hit taken is released: no page stays
    locked or referenced by this call."""
    kv_config = cache.kv_config if cache is not None else (kv_config or KVConfig(paged=True))
    check_prefix_config(model, kv_config, prefix_cache)
    if cache is None:
        cache = PagedKVCache(model.config, prefix_cache, press=kv_config.press, quant=kv_config.quant)
    elif cache.get_seq_length() or cache.prefix_cache is not prefix_cache:
        raise ValueError("generate with a PagedKVCache needs a fresh one (one per generate call).")
    cache.attach_model(model)
    batch, width = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lengths = mask.sum(dim=1).tolist()
    pads = [width - n for n in lengths]
    if not all(bool(mask[b, pads[b]:].all()) for b in range(batch)):
        raise ValueError("prefix_cache needs left-padded inputs (tokenizer.padding_side = 'left').")
    compressed = kv_config.press is not None or kv_config.quant is not None
    window = kv_config.press.query_window if kv_config.press is not None else 0
    ns = prefix_namespace(model) if namespace is None else namespace
    rows = [input_ids[b, pads[b]:].tolist() for b in range(batch)]
    hits: list[PrefixHit] = []
    try:
        for row in rows:  # inside the try: a failing match releases the hits taken before it
            # a compressing press observes the last `window` prompt queries: those are always computed, never matched
            hits.append(prefix_cache.match(ns, row, limit=max(0, len(row) - max(1, window))))
        row_caches = [_prefill_row(model, prefix_cache, row, hit, kv_config.press) for row, hit in zip(rows, hits)]
        if compressed and width > 1:  # (a 1-token batch is an ordinary prefill of the configured cache)
            pool_spec = shared_codes_spec(prefix_cache, cache.head_dim)
            codes = same_codes(kv_config.quant, pool_spec) and kv_config.press is None
            _defer_encoding(cache, prefix_cache, row_caches, hits, pads, width, kv_config.quant if codes else None)
        _assemble(cache, model.device, prefix_cache, row_caches, hits, pads, width)
        cache.record_hits(hits)
        expand = _expansion(model, kwargs)
        # compressed prompts are full precision only until their last token; beams/samples reorder rows: store now
        insert_prompts_now = compressed or expand > 1
        if insert_prompts_now:
            _insert(prefix_cache, ns, cache, hits, input_ids, [len(row) - 1 for row in rows], pads)
        if expand > 1:  # generate repeats each input row for beams / returned sequences; the cache must match
            cache.batch_repeat_interleave(expand)
        out = generate_fn(input_ids=input_ids, attention_mask=mask, **cache_kwargs(model, cache), **kwargs)
        if not insert_prompts_now:
            sequences = out.sequences if hasattr(out, "sequences") else out
            _insert(prefix_cache, ns, cache, hits, sequences, _stored_lengths(model, sequences, pads, width, kwargs),
                    pads)
    finally:
        for hit in hits:
            prefix_cache.release(hit)
    return out, cache


def _expansion(model, kwargs: dict) -> int:
    """How many rows generate makes of each input row (beams or returned sequences), as transformers computes it."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams", config.num_beams) or 1
    returned = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
    return max(beams, returned)


def _shared_prefix(prefix_cache: PrefixCache, layer_idx: int, tables, ends) -> SharedPrefix:
    """Rows' full-precision prefix tokens [0, ends[b]) of one layer, read in place from the pool's pages."""
    fields = prefix_cache.pool.layers[layer_idx]
    return SharedPrefix({"k": fields["k"], "v": fields["v"]}, tables, torch.zeros_like(ends), ends)


def _prefill_row(model, prefix_cache: PrefixCache, row: list[int], hit: PrefixHit, observer=None) -> KVPressCache:
    """Batch-1 cache of one row: the matched prefix in place, the rest of the prompt (but its last token) computed.

    With an `observer` press, its layers' press states observe the computed tokens (nothing is compressed here)."""
    cache = KVPressCache(model.config, press=observer)
    device = model.device
    if hit.n_tokens:
        table = torch.tensor([hit.pages], dtype=torch.int32, device=device)
        ends = torch.tensor([hit.n_tokens], dtype=torch.int32, device=device)
        for idx, layer in enumerate(cache.layers):
            layer.attach_prefix(_shared_prefix(prefix_cache, idx, table, ends), logical_length=hit.n_tokens)
    rest = row[hit.n_tokens : -1]
    if rest:
        with torch.inference_mode():
            model(input_ids=torch.tensor([rest], device=device), **cache_kwargs(model, cache), use_cache=True)
    return cache


def _assemble(cache, device, prefix_cache, row_caches, hits, pads, width) -> None:
    """Fill the batched cache: private tokens right-aligned per row (left slots masked), shared prefixes in place."""
    tables = _block_tables(hits, device)
    ends = torch.tensor([h.n_tokens for h in hits], dtype=torch.int32, device=device)
    for idx, layer in enumerate(cache.layers):
        parts = [rc.layers[idx].kv.main.store for rc in row_caches]
        longest = max(p.length for p in parts)
        fields = {"k": None, "v": None}
        if longest:
            like = next(p for p in parts if p.length)
            for name in ("k", "v"):
                template = like.view(name)
                rows = [torch.nn.functional.pad(p.view(name), (0, 0, longest - p.length, 0)) if p.length
                        else template.new_zeros(1, template.shape[1], longest, template.shape[3]) for p in parts]
                fields[name] = torch.cat(rows, dim=0)
        kv_start = torch.tensor([longest - p.length for p in parts], dtype=torch.int32, device=device)
        layer.load(fields["k"], fields["v"], kv_start, logical_length=width - 1)
        if bool((ends > 0).any()):
            layer.attach_prefix(_shared_prefix(prefix_cache, idx, tables, ends))


def _block_tables(hits: list[PrefixHit], device) -> torch.Tensor:
    """int32 (B, max pages) block tables of the rows' hits (unused entries 0, never read past a row's end)."""
    n_pages = max((len(h.pages) for h in hits), default=0)
    tables = torch.zeros(len(hits), max(n_pages, 1), dtype=torch.int32, device=device)
    for b, hit in enumerate(hits):
        if hit.pages:
            tables[b, : len(hit.pages)] = torch.tensor(hit.pages, dtype=torch.int32, device=device)
    return tables


def _shared_code_slots(quant, hits, pads, width) -> tuple[int, int]:
    """Stored slots [lo, hi) of the quantized middle that every row can read from the shared pages' codes.

    A left-padded prefill of `width` tokens stores slots [n_sink + max pad, width - residual) quantized; row b's slot j holds
    its token j - pads[b], matched (and shared) when j < pads[b] + n_tokens. Empty (lo == hi) when nothing fits."""
    lo = quant.n_sink + max(pads)  # the fp sink slots of a left-padded batch (SegmentedKV.n_sink)
    hi = min([max(lo, pad + hit.n_tokens) for hit, pad in zip(hits, pads)] + [width - quant.residual])
    return lo, max(lo, hi)


def _shared_codes(prefix_cache, layer_idx, hits, pads, slots, quant, device) -> SharedPrefix:
    """The rows' shared codes for stored slots [lo, hi): row b reads its tokens [lo - pad_b, hi - pad_b) (clipped
    at 0) from its pages, in place."""
    lo, hi = slots
    f = prefix_cache.pool.layers[layer_idx]
    fields = {"k": f["k_codes"], "v": f["v_codes"], "k_scale": f["k_scale"], "k_zero": f["k_zero"],
              "v_scale": f["v_scale"], "v_zero": f["v_zero"]}
    starts = torch.tensor([max(lo - pad, 0) for pad in pads], dtype=torch.int32, device=device)
    ends = torch.maximum(torch.tensor([hi - pad for pad in pads], dtype=torch.int32, device=device), starts)
    codec = quant.build_codec()
    return SharedPrefix(fields, _block_tables(hits, device), starts, ends, (codec.k_bits, codec.v_bits),
                        (codec.k_group, codec.v_group), rotations=codec.rotations(f["k"].shape[-1], device))


def _defer_encoding(cache, prefix_cache, row_caches, hits, pads, width, shared_quant=None) -> None:
    """Compressed requests: their layers start as full-precision layers (filled by `_assemble` like an uncompressed
    request: private tokens stored, shared prefix read in place) carrying a DeferredEncoding, so the prompt's last
    token attends in full precision and only then is the prompt quantized and pressed, one layer at a time, exactly
    as a left-padded prefill would (KVPressLayer.defer_encoding). With `shared_quant` (the request's quantization,
    whose codes the pool keeps), the quantized middle slots every row matched stay in the pool, read in place."""
    slots = _shared_code_slots(shared_quant, hits, pads, width) if shared_quant is not None else (0, 0)
    device = row_caches[0].layers[0].device if row_caches[0].layers[0].is_initialized else None
    for idx, layer in enumerate(cache.layers):
        state = None
        if layer.press is not None:  # what the press observed of each row's prompt, as one left-padded batch
            state = layer.press.new_state()
            state.take_rows([rc.layers[idx].press_state for rc in row_caches])
        shared = None
        if slots[1] > slots[0]:
            shared = _shared_codes(prefix_cache, idx, hits, pads, slots, shared_quant,
                                   device or prefix_cache.pool.device)
        layer.defer_encoding(state, shared, slots if shared is not None else (0, 0))


def _with_codes(prefix_cache, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the codes of the PrefixCache's `quant` (computed exactly as a quantized cache computes them) to full-
    precision fields (H_kv, n, D), when it keeps codes."""
    spec = shared_codes_spec(prefix_cache, fields["k"].shape[-1])
    if spec is None:
        return fields
    codes = spec.build_codec().encode(fields["k"], fields["v"])
    return {**fields, **{POOL_CODE_NAMES.get(name, name): t for name, t in codes.items()}}


def _stored_lengths(model, sequences, pads, width, kwargs) -> list[int]:
    """Per row: prompt + generated tokens up to its end of sequence whose KV the cache holds (the last generated
    token was never fed back)."""
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    steps = sequences.shape[1] - width
    lengths = []
    for b in range(sequences.shape[0]):
        generated = sequences[b, width:].tolist()
        n_gen = next((i for i, t in enumerate(generated) if t in eos), len(generated))
        n_real = width - pads[b]
        lengths.append(min(n_real + n_gen, n_real + steps - 1))
    return lengths


def _insert(prefix_cache, ns, cache, hits, sequences, lengths, pads) -> None:
    """Store each row's first lengths[b] tokens (whole pages only): full-precision KV = its shared prefix pages
    followed by its private tokens (the layers hold them in full precision: uncompressed, or deferred)."""
    for b, hit in enumerate(hits):
        n_store = lengths[b]
        if n_store < prefix_cache.page_size:
            continue
        tokens = sequences[b, pads[b] : pads[b] + n_store].tolist()
        layers = []
        for idx, layer in enumerate(cache.layers):
            shared = prefix_cache.gather(hit, idx) if hit.n_tokens else None
            start = int(layer.kv_start[b]) if layer.kv_start is not None else 0
            private_n = n_store - hit.n_tokens
            per_field = {}
            for name in ("k", "v"):
                private = layer.kv.main.store.view(name)[b, :, start : start + private_n] if private_n else None
                parts = [t for t in (shared[name] if shared is not None else None, private) if t is not None]
                per_field[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            layers.append(_with_codes(prefix_cache, per_field))
        prefix_cache.store(ns, tokens, layers)
