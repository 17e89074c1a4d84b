"""The "kvpress" attention function and mask, registered with transformers' attention interfaces.

Per layer and forward: the cache layer's `update()` stashed the new chunk; this function writes it into the layer's
store and attends over what the layer stores. Prefill (empty layer), extend (a chunk after a past) and decode (one
query) share one path; the mask of the new chunk comes from transformers (registered mask = sdpa's), the visibility
of stored tokens (left padding, sliding window) from the layer itself. Presses run after the chunk is stored.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("kvpress attention does not support attention logit softcapping (e.g. Gemma2).")
    layer.pending = None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return _attend(module, layer, query, key, value, attention_mask, dropout, scaling)


def _attend(module, layer, query, key, value, chunk_mask, dropout, scaling):
    n_past = layer.stored_length
    q_len = query.shape[2]
    chunk_valid = _chunk_validity(chunk_mask) if q_len > 1 else None
    layer.append({"k": key, "v": value}, chunk_valid)
    # An empty layer attends over exactly the new chunk with transformers' own mask: prefill is bit-identical.
    mask = chunk_mask if n_past == 0 else _stored_mask(layer, chunk_mask, n_past, q_len)
    out, _ = sdpa_attention_forward(module, query, layer.keys, layer.values, mask, dropout=dropout, scaling=scaling)
    if layer.is_sliding:
        layer.slide()
    return out, None


def _chunk_validity(chunk_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Q) bool: which new tokens are real (a padding key is attended by no query), None if all are."""
    if chunk_mask is None:
        return None
    if chunk_mask.dtype != torch.bool:
        chunk_mask = chunk_mask > torch.finfo(chunk_mask.dtype).min / 2
    return chunk_mask[:, 0].any(dim=1)


def _stored_mask(layer, chunk_mask: torch.Tensor | None, n_past: int, q_len: int) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, Q, n_past + Q) over stored tokens, or None when every stored token is visible."""
    window = layer.sliding_window
    sliding_cuts = window is not None and n_past + q_len > window
    if layer.kv_start is None and not sliding_cuts and q_len == 1:
        return None
    device = layer.keys.device
    cols = torch.arange(n_past, device=device)
    past = torch.ones(1, 1, q_len, n_past, dtype=torch.bool, device=device)
    if layer.kv_start is not None:
        past = past & (cols[None, None, None, :] >= layer.kv_start.to(device)[:, None, None, None])
    if window is not None:
        rows = torch.arange(q_len, device=device)
        # past token c sits at distance (n_past - c) + i from query i; visible while that is < window
        past = past & ((n_past - cols[None, :] + rows[:, None]) < window)[None, None]
    if chunk_mask is None:
        rows = torch.arange(q_len, device=device)
        chunk = rows[None, :] <= rows[:, None]
        if window is not None:
            chunk = chunk & (rows[:, None] - rows[None, :] < window)
        chunk = chunk[None, None]
    else:
        chunk = chunk_mask if chunk_mask.dtype == torch.bool else chunk_mask > torch.finfo(chunk_mask.dtype).min / 2
    batch = max(past.shape[0], chunk.shape[0])
    return torch.cat([past.expand(batch, 1, q_len, n_past), chunk.expand(batch, 1, q_len, q_len)], dim=-1)


def register() -> None:
    """Register the attention function and its mask under the name "kvpress" (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvpress_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
