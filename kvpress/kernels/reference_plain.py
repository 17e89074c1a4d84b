"""The plain oracle of the multi-store attention twins: every store's pages gathered and dequantized
(store_access.py) and rotated back if stored rotated, attended alone and merged by log-sum-exp. Obviously correct
and slow; the fast twins in kernels/reference.py (what runs on CPU) are tested against it."""
from __future__ import annotations

import math

import torch

from kvpress.kernels.store import (
    KVStore,
    check_decode_query,
    check_extend_query,
    check_score_args,
    check_store,
    check_stores,
    row_bounds,
)
from kvpress.kernels.store_access import gather_channel_keys, gather_dequantized, token_span

LOG2E = 1.4426950408889634
REFERENCE_CHUNK_ELEMENTS = 1 << 25  # score elements per chunk of query rows


def unrotated(tokens: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Dequantized tokens back in the model's frame (stored rotated: x @ R, so x = stored @ R.T)."""
    return tokens if rotation is None else tokens @ rotation.T


def _keys(store: KVStore, t_begin: int, t_end: int, group: int) -> torch.Tensor:
    """float32 keys (B, Hkv, T, D) of logical tokens [t_begin, t_end): per token, or per channel (k_block)."""
    if store.k_block is not None:
        return gather_channel_keys(store.k, store.k_scale, store.k_zero, store.block_table, t_begin, t_end,
                                   store.k_bits, store.k_block)
    return gather_dequantized(store.k, store.k_scale, store.k_zero, store.block_table, t_begin, t_end, store.k_bits,
                              group)


def store_attention_plain(q: torch.Tensor, store: KVStore, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Q, D) over one store's tokens [kv_start, kv_end) of each row (causal if the store is) -> out
    (B, Hq, Q, D) float32, natural-log lse (B, Hq, Q); empty rows give out 0, lse -inf. Query rows are processed in
    chunks to bound the score matrix."""
    geo = check_store(q, store)
    batch, q_heads, num_queries, head_dim = q.shape
    out = torch.zeros(batch, q_heads, num_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, q_heads, num_queries), -math.inf, dtype=torch.float32, device=q.device)
    kv_start, kv_end = row_bounds(store, batch, q.device)
    t_begin, t_end = token_span(kv_start, kv_end, store.block_table, geo.page_size)
    if t_end <= t_begin or out.numel() == 0:
        return out, lse
    keys = _keys(store, t_begin, t_end, geo.k_group)
    values = gather_dequantized(store.v, store.v_scale, store.v_zero, store.block_table, t_begin, t_end,
                                store.v_bits, geo.v_group)  # fmt: skip
    keys, values = unrotated(keys, store.k_rotation), unrotated(values, store.v_rotation)
    positions = torch.arange(t_begin, t_end, device=q.device)
    invalid = (positions[None, :] < kv_start[:, None]) | (positions[None, :] >= kv_end[:, None])
    invalid = invalid[:, None, None, :]  # (B, 1, 1, T)
    rows = geo.group * num_queries
    queries = q.float().reshape(batch, geo.kv_heads, rows, head_dim)
    out_rows = out.view(batch, geo.kv_heads, rows, head_dim)
    lse_rows = lse.view(batch, geo.kv_heads, rows)
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, batch * geo.kv_heads * (t_end - t_begin)))
    for r0 in range(0, rows, chunk):
        scores = torch.matmul(queries[:, :, r0 : r0 + chunk], keys.transpose(-1, -2)).mul_(sm_scale)
        scores.masked_fill_(invalid, -math.inf)
        if store.causal:  # rows are (head, query) pairs, query-minor
            query_index = torch.arange(r0, min(r0 + chunk, rows), device=q.device) % num_queries
            scores.masked_fill_(positions[None, :] > query_index[:, None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(torch.nan_to_num(row_lse, neginf=0.0).unsqueeze(-1)).exp_()
        out_rows[:, :, r0 : r0 + chunk] = torch.matmul(probs, values)
        lse_rows[:, :, r0 : r0 + chunk] = row_lse
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge over the leading axis of partials outs (N, ..., D) and natural-log lses (N, ...);
    partials with lse -inf get weight 0; all empty gives out 0, lse -inf."""
    top = lses.max(dim=0).values
    top = torch.where(top == -math.inf, torch.zeros_like(top), top)
    weights = torch.exp(lses - top)
    total = weights.sum(dim=0)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    parts = torch.where(weights[..., None] > 0, outs * weights[..., None], torch.zeros_like(outs))
    out = parts.sum(dim=0) / safe_total[..., None]
    lse = torch.where(nonempty, top + torch.log(safe_total), torch.full_like(top, -math.inf))
    return out, lse


def store_logits_plain(
    q: torch.Tensor, store: KVStore, sm_scale: float
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Decode logits in the log2 domain, q.k * sm_scale * log2(e), of q (B, Hq, D) against a store's tokens
    [t_begin, t_end) (the span of all rows): (t_begin, logits (B, Hq, t_end - t_begin) float32, valid (B, span)
    bool, True inside each row's [kv_start, kv_end)). What the fused decode writes when asked for scores."""
    geo = check_store(q[:, :, None], store)
    kv_start, kv_end = row_bounds(store, q.shape[0], q.device)
    t_begin, t_end = token_span(kv_start, kv_end, store.block_table, geo.page_size)
    t_end = max(t_end, t_begin)
    batch, q_heads, head_dim = q.shape
    keys = _keys(store, t_begin, t_end, geo.k_group)
    keys = unrotated(keys, store.k_rotation)
    queries = q.float().reshape(batch, geo.kv_heads, geo.group, head_dim)
    logits = torch.matmul(queries, keys.transpose(-1, -2)).mul_(sm_scale * LOG2E).reshape(batch, q_heads, -1)
    positions = torch.arange(t_begin, t_end, device=q.device)
    valid = (positions[None, :] >= kv_start[:, None]) & (positions[None, :] < kv_end[:, None])
    return t_begin, logits, valid


def extend_attention_multi_plain(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Q, D) over 1..MAX_STORES stores, each attended alone and merged exactly -> out (B, Hq, Q, D)
    float32 (or `out_dtype`), natural-log lse (B, Hq, Q) float32. `num_splits` only tunes the Triton kernel."""
    check_stores(q, stores)
    check_extend_query(q)
    parts = [store_attention_plain(q, store, sm_scale) for store in stores]
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        out, lse = merge_partials(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))
    return (out if out_dtype is None else out.to(out_dtype)), lse


def decode_attention_multi_plain(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
    num_splits: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, D) -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq).

    With `scores` (float32 (B, Hq, L)), also writes each attended token's logit in the log2 domain,
    q.k * sm_scale * log2(e), at column score_offsets[store] + token (the pass H2O's mass needs, fused)."""
    check_decode_query(q)
    check_score_args(q, stores, scores, score_offsets)
    out, lse = extend_attention_multi_plain(q[:, :, None], stores, sm_scale, out_dtype)
    if scores is not None:
        for store, offset in zip(stores, score_offsets):
            t_begin, logits, valid = store_logits_plain(q, store, sm_scale)
            columns = scores[:, :, offset + t_begin : offset + t_begin + logits.shape[2]]
            columns.copy_(torch.where(valid[:, None, :], logits, columns))
    return out[:, :, 0], lse[:, :, 0]
