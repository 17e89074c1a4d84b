"""Attention-mass helpers: how much softmax probability each stored key receives, computed in chunks so that no
T x T matrix is ever built. Used by H2O (accumulated mass, decode-time victims) and SnapKV (observation window)."""
import torch

from kvpress.presses.base import forced_keep_mask
from kvpress.presses.validation import (
    check_keys,
    check_non_negative_int,
    check_per_token_scores,
    check_queries,
    check_sm_scale,
    check_valid_mask,
)


def _masked_logits(
    query_rows: torch.Tensor,
    keys: torch.Tensor,
    sm_scale: float,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """float32 logits (B, Hkv, R, K) of query rows (B, Hkv, R, D) against keys (B, Hkv, K, D); -inf where the key is
    padding (key_valid (B, K) False) or lies after the query (key position > query position). key_positions must be
    ascending."""
    logits = torch.matmul(query_rows.float(), keys.float().transpose(-1, -2))
    if sm_scale != 1.0:
        logits.mul_(sm_scale)
    # Mask only what needs masking: most key chunks lie wholly before every query and hold no padding.
    if not bool(key_valid.all()):
        padding_bias = torch.zeros(key_valid.shape, dtype=logits.dtype, device=logits.device)
        padding_bias.masked_fill_(~key_valid, float("-inf"))
        logits.add_(padding_bias[:, None, None, :])
    if key_positions.numel() and bool(key_positions[-1] > query_positions.min()):
        in_future = key_positions[None, :] > query_positions[:, None]  # (R, K)
        logits.masked_fill_(in_future, float("-inf"))
    return logits


def _group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """View queries (B, Hq, Q, D) as (B, Hkv, G, Q, D): query head h belongs to kv head h // G."""
    batch, q_heads, n_queries, head_dim = queries.shape
    return queries.reshape(batch, kv_heads, q_heads // kv_heads, n_queries, head_dim)


def _check_mass_inputs(
    queries: torch.Tensor, keys: torch.Tensor, sm_scale: float, valid: torch.Tensor, causal_offset: int, chunk: int
) -> None:
    """Validate the common arguments of the attention-mass functions."""
    check_queries(queries, keys)
    check_sm_scale(sm_scale)
    batch, _, n_tokens, _ = keys.shape
    check_valid_mask(valid, batch, n_tokens)
    check_non_negative_int(causal_offset, "causal_offset")
    if causal_offset + queries.shape[2] > n_tokens:
        raise ValueError(
            f"queries sit at stored positions causal_offset .. causal_offset + Q - 1 = {causal_offset} .. "
            f"{causal_offset + queries.shape[2] - 1}, beyond the {n_tokens} stored keys; store the chunk's keys first"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")


MASS_BLOCK_BYTES = 1 << 22  # fp32 logits of one block of prefill queries (all heads): about two L2 caches


def _prefill_probability_blocks(queries, keys, sm_scale, valid, causal_offset, chunk):
    """Yield (start, stop, probs (B, Hkv, G * (stop - start), seen)) of query blocks: the softmax probabilities of
    queries [start, stop) (query i at stored position causal_offset + i, causal, padding keys masked, padding queries
    all zero) over the keys they can see (the first `seen` stored ones)."""
    batch, kv_heads, n_tokens, head_dim = keys.shape
    if chunk is None:
        chunk = max(1, MASS_BLOCK_BYTES // max(1, 4 * batch * queries.shape[1] * n_tokens))
    grouped = _group_queries(queries.float() * sm_scale, kv_heads)  # scaled once, not per block of logits
    group_size, n_queries = grouped.shape[2], grouped.shape[3]
    keys_f32 = keys.float()
    padded = not bool(valid.all())
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        seen = causal_offset + stop  # keys after the chunk's last query are masked for all of its queries
        # rows query-major (query i, then its group's heads), so the outputs of a block view as (Q, G, D)
        rows = grouped[:, :, :, start:stop].transpose(2, 3).reshape(batch, kv_heads, -1, head_dim)
        positions = (causal_offset + torch.arange(start, stop, device=keys.device)).repeat_interleave(group_size)
        if padded:
            key_positions = torch.arange(seen, device=keys.device)
            logits = _masked_logits(rows, keys_f32[:, :, :seen], 1.0, positions, key_positions, valid[:, :seen])
            # A row with no visible key (a padding query) gives NaN; it must contribute nothing.
            probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
            probs.mul_(valid[:, positions][:, None, :, None])
        else:  # every query sees at least itself: only the keys of the chunk itself need the causal mask
            logits = torch.matmul(rows, keys_f32[:, :, :seen].transpose(-1, -2))
            first = causal_offset + start
            diagonal = torch.arange(first, seen, device=keys.device)
            logits[..., first:].masked_fill_(diagonal[None, :] > positions[:, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
        yield start, stop, probs


def accumulate_attention_mass(
    queries: torch.Tensor,
    keys: torch.Tensor,
    sm_scale: float,
    valid: torch.Tensor,
    causal_offset: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """Softmax probability mass (B, Hkv, T) float32 each stored key receives from the Q queries of a prefill chunk,
    summed over the queries and over the query heads of each kv group.

    Query i sits at stored position causal_offset + i and sees the real keys at positions <= its own. Queries at
    padding positions contribute nothing. Processed `chunk` queries at a time (default: as many as keep the block's
    logits within MASS_BLOCK_BYTES, so that the softmax passes over them stay in cache; at 3k tokens on the CPU a
    third less time than 256-query blocks, which streamed ~28 MB of logits through memory per pass): memory
    O(Hq * chunk * T).
    """
    _check_mass_inputs(queries, keys, sm_scale, valid, causal_offset, 1 if chunk is None else chunk)
    batch, kv_heads, n_tokens, _ = keys.shape
    mass = torch.zeros(batch, kv_heads, n_tokens, dtype=torch.float32, device=keys.device)
    for _, _, probs in _prefill_probability_blocks(queries, keys, sm_scale, valid, causal_offset, chunk):
        mass[:, :, : probs.shape[-1]] += probs.sum(dim=2)
    return mass


def attention_with_mass(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a first prefill chunk over itself (queries (B, Hq, Q, D), keys/values (B, Hkv, Q, D), valid
    (B, Q) left padding) and the mass accumulate_attention_mass gives, from the same probabilities: one pass instead
    of SDPA + a second pass over the keys (H2O's prefill). Returns the output (B, Hq, Q, D) float32 (padding queries:
    zeros) and the mass (B, Hkv, Q)."""
    _check_mass_inputs(queries, keys, sm_scale, valid, 0, 1)
    batch, kv_heads, n_tokens, head_dim = keys.shape
    group = queries.shape[1] // kv_heads
    mass = torch.zeros(batch, kv_heads, n_tokens, dtype=torch.float32, device=keys.device)
    out = torch.empty(batch, kv_heads, n_tokens, group, head_dim, dtype=torch.float32, device=keys.device)
    values_f32 = values.float()
    for start, stop, probs in _prefill_probability_blocks(queries, keys, sm_scale, valid, 0, None):
        seen = probs.shape[-1]
        mass[:, :, :seen] += probs.sum(dim=2)
        out[:, :, start:stop] = torch.matmul(probs, values_f32[:, :, :seen]).view(batch, kv_heads, stop - start,
                                                                                   group, head_dim)
    return out.permute(0, 1, 3, 2, 4).reshape(batch, kv_heads * group, n_tokens, head_dim), mass


def window_attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, sm_scale: float, valid: torch.Tensor, key_chunk: int = 1024
) -> torch.Tensor:
    """Softmax probability mass (B, Hkv, T) float32 that the last W prompt queries (B, Hq, W, D), the last one at
    stored position T-1, give each key, summed over the queries and the query heads of each kv group.

    Causal inside the window, padding keys masked, padding queries ignored. Two passes over key chunks (online
    max/sum, then normalised probabilities), so memory is O(Hq * W * key_chunk), never W x T or T x T at once.
    """
    batch, kv_heads, n_tokens, head_dim = check_keys(keys)
    if queries.dim() == 4 and queries.shape[2] > n_tokens:
        raise ValueError(
            f"the window has {queries.shape[2]} queries but only {n_tokens} tokens are stored; pass at most the last "
            f"T prompt queries"
        )
    _check_mass_inputs(queries, keys, sm_scale, valid, n_tokens - queries.shape[2], key_chunk)
    grouped = _group_queries(queries, kv_heads)
    group_size, window = grouped.shape[2], grouped.shape[3]
    rows = grouped.reshape(batch, kv_heads, group_size * window, head_dim).float()
    query_positions = (n_tokens - window + torch.arange(window, device=keys.device)).repeat(group_size)
    query_is_real = valid[:, query_positions][:, None, :]  # (B, 1, R)

    def chunk_logits(start: int, stop: int) -> torch.Tensor:
        key_positions = torch.arange(start, stop, device=keys.device)
        return _masked_logits(rows, keys[:, :, start:stop], sm_scale, query_positions, key_positions,
                              valid[:, start:stop])

    row_max = torch.full(rows.shape[:3], float("-inf"), device=keys.device)
    row_sum = torch.zeros(rows.shape[:3], device=keys.device)
    for start in range(0, n_tokens, key_chunk):
        logits = chunk_logits(start, min(start + key_chunk, n_tokens))
        new_max = torch.maximum(row_max, logits.amax(dim=-1))
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        row_sum = row_sum * torch.exp(row_max - shift) + logits.sub_(shift[..., None]).exp_().sum(dim=-1)
        row_max = new_max

    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    inverse_sum = torch.where(row_sum > 0, 1.0 / row_sum, torch.zeros_like(row_sum)) * query_is_real
    mass = torch.empty(batch, kv_heads, n_tokens, dtype=torch.float32, device=keys.device)
    for start in range(0, n_tokens, key_chunk):
        stop = min(start + key_chunk, n_tokens)
        probs = chunk_logits(start, stop).sub_(shift[..., None]).exp_().mul_(inverse_sum[..., None])
        mass[:, :, start:stop] = probs.sum(dim=2)
    return mass


def decode_victims(
    mass: torch.Tensor, n_evict: int, n_sink: int, recent: int, valid: torch.Tensor | None
) -> torch.Tensor:
    """Indices (B, Hkv, n_evict) int64, sorted ascending, of the stored tokens to evict during decoding: padding first,
    then the real tokens with the lowest accumulated mass; the first n_sink real tokens and the last `recent` tokens of
    each row are never chosen. `valid` None: no padding (every stored token is real; the protected tokens are then
    plain slices, a few ops fewer per decode step)."""
    if mass.dim() != 3:
        raise ValueError(f"mass must have shape (B, Hkv, T); got {tuple(mass.shape)}")
    batch, _, n_tokens = mass.shape
    check_per_token_scores(mass, "mass", tuple(mass.shape))
    if valid is not None:
        check_valid_mask(valid, batch, n_tokens)
    check_non_negative_int(n_sink, "n_sink")
    check_non_negative_int(recent, "recent")
    evictable = n_tokens - n_sink - recent
    if isinstance(n_evict, bool) or not isinstance(n_evict, int) or not 0 <= n_evict <= max(evictable, 0):
        raise ValueError(
            f"n_evict must be an integer in [0, T - n_sink - recent] = [0, {max(evictable, 0)}] "
            f"(T={n_tokens}, n_sink={n_sink}, recent={recent}); got {n_evict!r}"
        )
    finite_max = torch.finfo(torch.float32).max
    ranked = torch.nan_to_num(mass.float(), nan=finite_max, posinf=finite_max, neginf=-finite_max)
    if valid is None:  # the first n_sink and last `recent` positions are the protected real tokens
        if n_sink:
            ranked[:, :, :n_sink] = float("inf")
        if recent:
            ranked[:, :, n_tokens - recent :] = float("inf")
    else:
        ranked = ranked.masked_fill(~valid[:, None, :], float("-inf"))
        ranked = ranked.masked_fill(forced_keep_mask(valid, n_sink, recent)[:, None, :], float("inf"))
    victims = torch.topk(ranked, n_evict, dim=-1, largest=False, sorted=False).indices
    return torch.sort(victims, dim=-1).values.to(torch.int64)
