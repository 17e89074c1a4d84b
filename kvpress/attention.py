"""The "kvpress" attention function and mask, registered with transformers' attention interfaces.

Per layer and forward: the cache layer's `update()` stashed the new chunk; this function attends and writes the
chunk into the layer's segments. Three phases share it:
- prefill (empty layer): SDPA over the chunk with transformers' own mask (bit-identical to the plain model);
- extend (a chunk after stored tokens): kernels over each stored segment + the chunk itself, merged exactly (without
  Triton: one SDPA over the dequantized stored tokens + the chunk);
- decode (one query): the token is stored first, then one fused kernel reads every segment and the shared prefix
  (decode_attention_multi; the unquantized, unpressed case uses SDPA over the stored view, which is exactly what
  transformers computes).
The mask of the new chunk comes from transformers (registered mask = sdpa's); which stored tokens a row sees
(left padding, filler slots, sliding window) comes from the layer. Presses observe each stored prefill chunk and
compress when the prompt is complete (first decode step), or after every chunk with `compress_every_chunk=True`.
"""
from __future__ import annotations

import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import chunk_store, decode_attention_multi, extend_attention_multi, kernel_backend, merge_attention_states
from .kernels.head_rows import as_head_rows, merge_heads, split_heads
from .presses.attention_mass import attention_with_mass

ATTENTION_NAME = "kvpress"


def kvpress_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for models wrapped by kvpress; falls back to SDPA when no KVPressCache is in use."""
    layer = key.__dict__.pop("_kvpress_layer", None)
    if layer is None or not layer.consume(key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("kvpress attention does not support attention logit softcapping (e.g. Gemma2).")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len = query.shape[2]
    chunk_valid = _chunk_validity(attention_mask) if q_len > 1 else None
    if q_len == 1:  # (the cache compressed the observed prompt when this step began: KVPressCache.update)
        layer.before_decode()  # decode-time eviction of a bounded press
    elif layer.stored_length == 0 and layer.prefix is None and layer.wants_prefill_mass():
        causal, _ = _causal_chunk(attention_mask, chunk_valid, layer.sliding_window)
        if causal:  # H2O's first chunk: attention and its probability mass in one pass
            out, mass = _attend_with_mass(layer, query, key, value, chunk_valid, scaling)
            layer.finish_forward(query, scaling, mass)
            return out, None
    plain = layer.kv.quant is None and layer.prefix is None and layer.kv.pressed is None
    if plain and not (q_len == 1 and layer.wants_decode_logits()):
        out = _attend_unquantized(module, layer, query, key, value, attention_mask, chunk_valid, dropout, scaling)
    elif q_len == 1:
        out = _decode_segments(layer, query, key, value, scaling)
    else:
        out = _extend_segments(module, layer, query, key, value, attention_mask, chunk_valid, dropout, scaling)
    layer.finish_forward(query, scaling)  # deferred encoding, press observation (compress_every_chunk), sliding
    return out, None


def _attend_unquantized(module, layer, query, key, value, chunk_mask, chunk_valid, dropout, scaling):
    """fp store: write the chunk, then SDPA over the stored view (no concatenation, same math as transformers)."""
    n_past = layer.stored_length
    layer.append(key, value, chunk_valid)
    mask = chunk_mask if n_past == 0 else _stored_mask(layer, chunk_mask, n_past, query.shape[2])
    out, _ = sdpa_attention_forward(module, query, layer.keys, layer.values, mask, dropout=dropout, scaling=scaling)
    return out


def _attend_with_mass(layer, query, key, value, chunk_valid, scaling):
    """A layer's first prefill chunk (plain causal after left padding) when its press wants the attention's mass:
    one blocked pass gives the output and the mass (instead of SDPA and a second pass over the keys); then store."""
    valid = chunk_valid if chunk_valid is not None else torch.ones(key.shape[0], key.shape[2], dtype=torch.bool,
                                                                   device=key.device)
    out, mass = attention_with_mass(query, key, value, scaling, valid)
    layer.append(key, value, chunk_valid)
    return out.to(query.dtype).transpose(1, 2).contiguous(), mass


def _decode_segments(layer, query, key, value, scaling):
    """One new token: store it, then attend over every segment (and the shared prefix) in one fused kernel call.
    When the layer wants them (H2O), the same call stores each attended token's logit (no second pass over the keys)
    and hands them over with the final lse (layer.observe_decode)."""
    layer.append(key, value, None)
    stores, offsets = _layer_stores(layer)
    q = query[:, :, 0]
    if layer.kv.pressed is not None:  # heads of different lengths: one row per (row, kv head)
        out, _ = decode_attention_multi(split_heads(q, layer.kv.pressed.heads), stores, scaling, out_dtype=query.dtype)
        return merge_heads(out, q.shape[0])[:, None]
    if not layer.wants_decode_logits():
        out, lse = decode_attention_multi(q, stores, scaling, out_dtype=query.dtype)
        return out[:, None]  # (B, 1, Hq, D), contiguous
    scores = torch.empty(*q.shape[:2], layer.stored_length, dtype=torch.float32, device=q.device)
    out, lse = decode_attention_multi(q, stores, scaling, out_dtype=query.dtype, scores=scores,
                                      score_offsets=offsets)  # fmt: skip
    layer.observe_decode(scores, lse)
    return out[:, None]


def _layer_stores(layer) -> tuple[tuple, tuple[int, ...]]:
    """The layer's non-empty segments (then its shared prefix) as KVStores of the multi-store kernels, and the
    segments' logical offsets (where each one's logits go for H2O). After a per-head compression every store has
    one kv head per (row, head) row (kernels/head_rows.py), the compression's own stores first."""
    segments = [(seg, off) for seg, off in layer.kv.offsets() if seg.length]
    stores = [seg.kernel_store(layer.kv_start, off) for seg, off in segments]
    if layer.prefix is not None:
        stores.append(layer.prefix.kernel_store())
    if layer.kv.pressed is not None:
        return (*layer.kv.pressed.kernel_stores(), *map(as_head_rows, stores)), ()
    return tuple(stores), tuple(off for _, off in segments)


def _extend_segments(module, layer, query, key, value, chunk_mask, chunk_valid, dropout, scaling):
    """A chunk after stored tokens: one multi-store kernel call over every stored segment, the shared prefix and the
    chunk itself (causal) when the chunk's mask is plain causal after left padding; otherwise one multi-store call
    over the stored stores + masked attention within the chunk, merged."""
    if layer.stored_length == 0 and layer.prefix is None:
        out, _ = sdpa_attention_forward(module, query, key, value, chunk_mask, dropout=dropout, scaling=scaling)
        layer.append(key, value, chunk_valid)
        return out
    pressed = layer.kv.pressed
    if layer.prefix is None and pressed is None and kernel_backend(query.device) == "reference":
        return _extend_dequantized(module, layer, query, key, value, chunk_mask, chunk_valid, dropout, scaling)
    causal, chunk_start = _causal_chunk(chunk_mask, chunk_valid, layer.sliding_window)
    stores = _layer_stores(layer)[0]
    if causal:
        chunk = chunk_store(key, value, chunk_start)
        if pressed is not None:  # one row per (row, kv head)
            stores = (*stores, as_head_rows(chunk))
            out, _ = extend_attention_multi(split_heads(query, pressed.heads), stores, scaling, out_dtype=query.dtype)
            out = merge_heads(out, query.shape[0])
        else:
            out, _ = extend_attention_multi(query, (*stores, chunk), scaling, out_dtype=query.dtype)
        layer.append(key, value, chunk_valid)
        return out.transpose(1, 2).contiguous()
    out, lse = _chunk_attention(query, key, value, chunk_mask, scaling, layer.sliding_window)
    if pressed is not None:
        stored_out, stored_lse = extend_attention_multi(split_heads(query, pressed.heads), stores, scaling)
        stored = (merge_heads(stored_out, query.shape[0]), merge_heads(stored_lse, query.shape[0]))
    else:
        stored = extend_attention_multi(query, stores, scaling)
    out, lse = merge_attention_states(out, lse, *stored)
    layer.append(key, value, chunk_valid)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _extend_dequantized(module, layer, query, key, value, chunk_mask, chunk_valid, dropout, scaling):
    """Torch path (no Triton): SDPA over the dequantized stored tokens followed by the chunk - the same attention as
    the kernels + merges, in one fused SDPA call (per-segment torch attention is ~2.5x slower on CPU)."""
    n_past = layer.stored_length
    k_past, v_past = layer.kv.dequantized(layer.head_dim, query.dtype)
    mask = _stored_mask(layer, chunk_mask, n_past, query.shape[2])
    keys, values = torch.cat([k_past, key], dim=2), torch.cat([v_past, value], dim=2)
    out, _ = sdpa_attention_forward(module, query, keys, values, mask, dropout=dropout, scaling=scaling)
    layer.append(key, value, chunk_valid)
    return out


CHUNK_LOGITS_BUDGET = 1 << 28  # bytes of fp32 logits materialised at once inside a chunk
# per thread, `.last` = (weak ref, version, result) of the last chunk mask compared: a forward's layers (one thread)
# share it, and threads generating concurrently never see each other's masks
_last_causal_check = threading.local()


def _causal_chunk(chunk_mask, chunk_valid, window) -> tuple[bool, torch.Tensor | None]:
    """(True, rows' first real chunk token (B,) or None) when the chunk's mask is plain causal attention after left
    padding - what the kernels' causal chunk store computes - else (False, None): sliding windows and other masks
    keep the masked torch path. A given mask is compared once (one host sync per forward, not per layer; the last
    comparison is remembered per thread)."""
    if window is not None:
        return False, None
    if chunk_mask is None:
        return True, None
    q_len = chunk_valid.shape[1]
    if chunk_mask.dim() != 4 or chunk_mask.shape[-2:] != (q_len, q_len):
        return False, None
    start = (q_len - chunk_valid.sum(dim=1)).to(torch.int32)
    checked = getattr(_last_causal_check, "last", None)  # read once: (ref, version, result) belong together
    if checked is None or checked[0]() is not chunk_mask or checked[1] != chunk_mask._version:
        positions = torch.arange(q_len, device=chunk_mask.device)
        expected = (positions[None, :] <= positions[:, None])[None] & (positions[None, None, :] >= start[:, None, None])
        got = _as_bool(chunk_mask)[:, 0]
        checked = (weakref.ref(chunk_mask), chunk_mask._version, bool((got == expected).all()))
        _last_causal_check.last = checked
    return checked[2], start


def _chunk_attention(query, key, value, chunk_mask, scaling, window):
    """Attention of the chunk's queries over the chunk's own keys (causal + padding), with its log-sum-exp.

    Processed in query blocks so that the fp32 logits never exceed CHUNK_LOGITS_BUDGET bytes.
    """
    batch, heads, q_len, _ = query.shape
    group = heads // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    block = max(1, min(q_len, CHUNK_LOGITS_BUDGET // max(1, 4 * batch * heads * q_len)))
    cols = torch.arange(q_len, device=query.device)
    outs, lses = [], []
    for lo in range(0, q_len, block):
        rows = cols[lo : lo + block]
        if chunk_mask is None:
            allowed = _causal_within_chunk(rows, cols, window)
        else:
            allowed = _as_bool(chunk_mask)[:, :, lo : lo + block]
        logits = (query[:, :, lo : lo + block].float() @ k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(probs @ v)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _causal_within_chunk(rows: torch.Tensor, cols: torch.Tensor, window: int | None) -> torch.Tensor:
    """(1, 1, len(rows), len(cols)) bool: chunk query i sees chunk key j <= i (and i - j < window if sliding)."""
    allowed = cols[None, :] <= rows[:, None]
    if window is not None:
        allowed = allowed & (rows[:, None] - cols[None, :] < window)
    return allowed[None, None]


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _chunk_validity(chunk_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Q) bool: which new tokens are real (a padding key is attended by no query), None if all are."""
    if chunk_mask is None:
        return None
    return _as_bool(chunk_mask)[:, 0].any(dim=1)


def _stored_mask(layer, chunk_mask: torch.Tensor | None, n_past: int, q_len: int) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, Q, n_past + Q) over stored tokens, or None when every stored token is visible."""
    window = layer.sliding_window
    sliding_cuts = window is not None and n_past + q_len > window
    if layer.kv_start is None and not sliding_cuts and q_len == 1:
        return None
    device = layer.device
    if q_len == 1 and window is None:  # decode with left padding: the new token is real and sees itself (2 ops)
        cols = torch.arange(n_past + 1, device=device)
        return (cols[None, :] >= layer.kv_start.to(device)[:, None])[:, None, None, :]
    cols = torch.arange(n_past, device=device)
    rows = torch.arange(q_len, device=device)
    past = torch.ones(1, 1, q_len, n_past, dtype=torch.bool, device=device)
    if layer.kv_start is not None:
        past = past & (cols[None, None, None, :] >= layer.kv_start.to(device)[:, None, None, None])
    if window is not None:
        # past token c sits at distance (n_past - c) + i from query i; visible while that is < window
        past = past & ((n_past - cols[None, :] + rows[:, None]) < window)[None, None]
    chunk = _causal_within_chunk(rows, rows, window) if chunk_mask is None else _as_bool(chunk_mask)
    batch = max(past.shape[0], chunk.shape[0])
    return torch.cat([past.expand(batch, 1, q_len, n_past), chunk.expand(batch, 1, q_len, q_len)], dim=-1)


def register() -> None:
    """Register the attention function and its mask under the name "kvpress" (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvpress_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
