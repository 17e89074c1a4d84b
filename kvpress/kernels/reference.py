"""Torch twins of the multi-store attention kernels (kernels/multi.py): same signatures, same results. This is what
runs on CPU, so each store is read in a handful of ops: codes are converted to float once per call (never
dequantized element by element when the groups allow; key codes in cache-sized chunks, each multiplied while still in
cache), logits come from the codes, q.(s*c + z) = s*(q.c) + z*sum(q) per token and group, and the stores' logits
share one softmax. Rotated stores (KVStore.k_rotation / v_rotation) cost
one small matmul on q and one on their share of the output. kernels/reference_plain.py is the slow oracle they
are tested against."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from kvpress.kernels.store import (
    KVStore,
    check_decode_query,
    check_extend_query,
    check_score_args,
    check_stores,
    row_bounds,
)
from kvpress.kernels.store_access import gather_tokens, token_span

LOG2E = 1.4426950408889634
REFERENCE_CHUNK_ELEMENTS = 1 << 24  # logits elements per block of query rows (extend)
CACHE_CHUNK_BYTES = 1 << 22  # float32 tiles converted from codes per matmul (_codes_matmul), chosen by measurement


@dataclass
class _Span:
    """The tokens [begin, end) of a store that some row attends, and which rows attend which (None: every row
    attends all of them)."""

    begin: int
    end: int
    valid: torch.Tensor | None  # (B, end - begin) bool


def _span(store: KVStore, batch: int, device: torch.device) -> _Span:
    """The attended span of a store: no tensor op for int bounds, one validity mask for per-row bounds."""
    start, end = store.kv_start, store.kv_end
    if not isinstance(start, torch.Tensor) and not isinstance(end, torch.Tensor):
        if end > store.capacity:
            raise ValueError(f"need kv_end <= max_pages * page_size = {store.capacity}")
        return _Span(min(start, end), end, None)
    start, end = row_bounds(store, batch, device)
    begin, stop = token_span(start, end, store.block_table, store.page_size)
    stop = max(stop, begin)
    positions = torch.arange(begin, stop, device=device)
    valid = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
    return _Span(begin, stop, valid)


def _one_page_per_row(store: KVStore, end: int) -> bool:
    """True when row b's tokens are the first slots of page b (the contiguous store): fields are sliced, not
    gathered."""
    table = store.block_table
    batch = table.shape[0]
    if table.shape[1] != 1 or store.k.shape[0] != batch or end > store.page_size:
        return False
    if batch == 1:
        return True  # one page: the table can only name it
    return bool(torch.equal(table[:, 0], torch.arange(batch, device=table.device, dtype=table.dtype)))


def _tokens(field: torch.Tensor, store: KVStore, span: _Span, sliced: bool) -> torch.Tensor:
    """Raw per-token rows (B, Hkv, T, X) of the span: a view for the contiguous store, else one gather."""
    if sliced:
        return field[:, :, span.begin : span.end]
    return gather_tokens(field, store.block_table, span.begin, span.end, False)


def _float_codes(raw: torch.Tensor, bits: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Codes as float32 parts (B, Hkv, P, T, width): part k holds sub-code k of every stored byte, i.e. head-dim
    elements [k * width, (k + 1) * width) (P = 2 for 4-bit codes: low / high nibbles; 4 for 2-bit codes: split
    quarters; else 1, and 16-bit fields are just converted). Each part is written contiguously straight into one
    float buffer (uint8 -> float32 on assignment, no stacked copy): `buffer` (flat float32 of the right size, e.g.
    scratch) or a new one."""
    b, h, t, width = raw.shape
    n_parts = _parts(bits)
    numel = b * h * n_parts * t * width
    parts = (torch.empty(numel, dtype=torch.float32, device=raw.device) if buffer is None else buffer[:numel]).view(
        b, h, n_parts, t, width)
    mask = (1 << bits) - 1
    for k in range(n_parts):
        shifted = raw >> (bits * k) if k else raw
        parts[:, :, k] = shifted & mask if k + 1 < n_parts else shifted
    return parts


def _parts(bits: int) -> int:
    """Codes per stored byte, read as that many float parts: 2 for 4-bit codes, 4 for 2-bit codes, else 1."""
    return 8 // bits if bits in (2, 4) else 1


class _Scratch(threading.local):
    """One float32 buffer per thread that _codes_matmul converts code chunks into, reused across calls (grown to
    the largest chunk, at most CACHE_CHUNK_BYTES); per thread, so concurrent generate calls never share it."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A flat float32 view of at least `numel` elements on `device` (valid until the next take)."""
        if self.buffer.numel() < numel or self.buffer.device != device:
            self.buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self.buffer


_SCRATCH = _Scratch()


class _Field:
    """One stored field (k or v) of a store's span, read once per call: codes (or 16-bit values) and, for codes,
    float scale and zero (B, Hkv, G, T). One group per part (or one over the whole head dim) stays codes, converted to
    float only inside the matmuls that read them (_codes_matmul) and factored into them; more groups per part are
    dequantized here (then `quantized` is False). Keys per channel (`block`) keep the codes of the whole blocks
    around the span and their scales / zeros per (block, channel), read by _channel_key_logits."""

    def __init__(self, store: KVStore, name: str, span: _Span, sliced: bool) -> None:
        self.bits = store.k_bits if name == "k" else store.v_bits
        self.quantized = self.bits != 16
        self.parts: torch.Tensor | None = None  # float parts (B, Hkv, P, T, W) once converted
        self.scale = self.zero = None  # float (B, Hkv, G, T): token-minor, so broadcasts over rows are contiguous
        self.block = store.k_block if name == "k" else None  # keys per channel over blocks of this many tokens
        if self.block is not None:  # whole blocks around the span: codes, and (B, Hkv, blocks, D) scales / zeros
            first, last = span.begin // self.block * self.block, -(-span.end // self.block) * self.block
            whole = _Span(first, last, None)
            sliced = _one_page_per_row(store, last)
            self.codes = _tokens(store.k, store, whole, sliced)
            self.offset = span.begin - first  # the span's first token within the blocks
            b, h = self.codes.shape[:2]
            self.scale, self.zero = (_tokens(getattr(store, f"k_{part}"), store, whole, sliced).float()
                                     .reshape(b, h, (last - first) // self.block, -1) for part in ("scale", "zero"))
            return
        self.codes = _tokens(getattr(store, name), store, span, sliced)  # (B, Hkv, T, X) as stored
        if not self.quantized:
            self.parts = self.codes.float().unsqueeze(2)
            return
        self.scale, self.zero = (
            _tokens(getattr(store, f"{name}_{part}"), store, span, sliced)
            .transpose(-1, -2)
            .to(torch.float32, memory_format=torch.contiguous_format)
            for part in ("scale", "zero")
        )
        n_parts, groups = self.n_parts, self.scale.shape[2]
        if groups > n_parts:  # several groups per part: dequantize (the factored form needs whole parts per group)
            self.parts = _float_codes(self.codes, self.bits)
            b, h, _, t, width = self.parts.shape
            grouped = self.parts.view(b, h, n_parts, t, groups // n_parts, width * n_parts // groups)
            per_part = (b, h, n_parts, groups // n_parts, t)
            grouped.mul_(self.scale.view(per_part).transpose(-1, -2)[..., None])
            grouped.add_(self.zero.view(per_part).transpose(-1, -2)[..., None])
            self.quantized = False

    @property
    def n_parts(self) -> int:
        """Float parts the head dim is read in (_parts)."""
        return _parts(self.bits)

    def part_scales(self) -> torch.Tensor:
        """Scales per (part, token): (B, Hkv, P or 1, 1, T) (a group spanning several parts repeats its scale)."""
        scales = self.scale.unsqueeze(3)
        groups = scales.shape[2]
        return scales if groups in (1, self.n_parts) else scales.repeat_interleave(self.n_parts // groups, dim=2)


def _codes_matmul(lhs: torch.Tensor, field: _Field, keys: bool) -> torch.Tensor:
    """lhs (B, Hkv, P or 1, R, X) @ the field's float parts (B, Hkv, P, T, W), transposed for keys (X = W) -> (B, Hkv,
    P, R, T or W). Codes are converted to float32 in chunks of (row, kv head) pairs and tokens of at most
    CACHE_CHUNK_BYTES, written into one per-thread scratch buffer (_SCRATCH) and multiplied while still in cache:
    no per-call allocation of the whole span's floats, which the allocator would return to the OS and page-fault
    back every step (measured on the CPU: a third of an int8-int4 decode call)."""
    if field.parts is not None:
        return torch.matmul(lhs, field.parts.transpose(-1, -2) if keys else field.parts)
    codes = field.codes
    b, h, t, width = codes.shape
    pairs, n_parts, rows = b * h, field.n_parts, lhs.shape[3]
    part_width = width  # quantized: bytes per token = elements per part
    token_bytes = 4 * n_parts * part_width
    chunk_tokens = max(1, min(t, CACHE_CHUNK_BYTES // token_bytes))
    step = max(1, CACHE_CHUNK_BYTES // (token_bytes * max(t, 1))) if chunk_tokens == t else 1  # pairs per chunk
    flat_lhs, flat_codes = lhs.reshape(pairs, lhs.shape[2], rows, -1), codes.reshape(1, pairs, t, width)
    out = torch.zeros if t == 0 else torch.empty
    out = out(pairs, n_parts, rows, t if keys else part_width, dtype=torch.float32, device=lhs.device)
    for i in range(0, pairs, step):
        j = min(pairs, i + step)
        for t0 in range(0, t, chunk_tokens):
            t1 = min(t, t0 + chunk_tokens)
            buffer = _SCRATCH.take((j - i) * n_parts * (t1 - t0) * part_width, codes.device)
            parts = _float_codes(flat_codes[:, i:j, t0:t1], field.bits, buffer)[0]  # (pairs, P, T, W)
            if keys and chunk_tokens == t:
                torch.matmul(flat_lhs[i:j], parts.transpose(-1, -2), out=out[i:j])
            elif keys:
                out[i:j, :, :, t0:t1] = torch.matmul(flat_lhs[i:j], parts.transpose(-1, -2))
            elif t0 == 0:
                torch.matmul(flat_lhs[i:j, :, :, t0:t1], parts, out=out[i:j])
            else:
                out[i:j] += torch.matmul(flat_lhs[i:j, :, :, t0:t1], parts)
    return out.view(b, h, *out.shape[1:])


def _channel_key_logits(qs: torch.Tensor, keys: _Field, width: int) -> torch.Tensor:
    """Logits (B, Hkv, R, width) of qs (B, Hkv, R, D) against per-channel keys, from the codes: per block i,
    (q * s_i) . c + q . z_i, so the codes are only converted, never dequantized; converted in cache-sized chunks of
    (row, kv head) pairs and blocks into the scratch buffer, like _codes_matmul."""
    b, h, rows, head_dim = qs.shape
    codes, block, n_parts = keys.codes, keys.block, keys.n_parts
    pairs, tokens, part_width = b * h, codes.shape[2], head_dim // n_parts
    blocks = tokens // block
    block_bytes = 4 * head_dim * block
    chunk_blocks = max(1, min(blocks, CACHE_CHUNK_BYTES // block_bytes))
    step = max(1, CACHE_CHUNK_BYTES // (block_bytes * max(blocks, 1))) if chunk_blocks == blocks else 1
    flat_q, flat_codes = qs.reshape(pairs, rows, head_dim), codes.reshape(1, pairs, tokens, codes.shape[-1])
    scale, zero = keys.scale.reshape(pairs, blocks, head_dim), keys.zero.reshape(pairs, blocks, head_dim)
    logits = torch.empty(pairs, rows, tokens, dtype=torch.float32, device=qs.device)
    for i in range(0, pairs, step):
        j = min(pairs, i + step)
        for n0 in range(0, blocks, chunk_blocks):
            n1 = min(blocks, n0 + chunk_blocks)
            t0, t1 = n0 * block, n1 * block
            buffer = _SCRATCH.take((j - i) * (t1 - t0) * head_dim, codes.device)
            parts = _float_codes(flat_codes[:, i:j, t0:t1], keys.bits, buffer)[0]  # (pairs, P, T, W)
            parts = parts.view(j - i, n_parts, n1 - n0, block, part_width)
            scaled = flat_q[i:j, None] * scale[i:j, n0:n1, None]  # (pairs, n, R, D)
            scaled = scaled.view(j - i, n1 - n0, rows, n_parts, part_width).permute(0, 3, 1, 2, 4)  # (pairs, P, n, R, W)
            dots = torch.matmul(scaled, parts.transpose(-1, -2)).sum(1)  # (pairs, n, R, block)
            dots.add_(torch.matmul(zero[i:j, n0:n1], flat_q[i:j].transpose(-1, -2)).unsqueeze(-1))  # + q . z_i
            logits[i:j, :, t0:t1] = dots.transpose(1, 2).reshape(j - i, rows, t1 - t0)
    return logits.view(b, h, rows, tokens)[..., keys.offset : keys.offset + width]


def _key_logits(qs: torch.Tensor, keys: _Field, q_sums: dict[int, torch.Tensor], width: int) -> torch.Tensor:
    """Logits (B, Hkv, R, T = width) of pre-scaled queries qs (B, Hkv, R, D) against a store's keys, from the codes:
    per part, (q.c) * s + sum(q) * z. `q_sums` caches sum(q) per group count (shared by the stores of a call)."""
    if keys.block is not None:
        return _channel_key_logits(qs, keys, width)
    b, h, rows, head_dim = qs.shape
    n_parts = keys.n_parts
    if n_parts == 1:
        logits = _codes_matmul(qs.unsqueeze(2), keys, True)[:, :, 0]  # (B, Hkv, R, T)
    else:
        q_parts = qs.view(b, h, rows, n_parts, head_dim // n_parts).transpose(2, 3)  # (B, Hkv, P, R, W)
        dots = _codes_matmul(q_parts, keys, True)  # (B, Hkv, P, R, T)
        groups = keys.scale.shape[2] if keys.quantized else 1
        if groups != 1:  # whole parts per group: scale each part, then sum them
            return dots.mul_(keys.part_scales()).sum(2).add_(torch.matmul(_q_sums(qs, groups, q_sums), keys.zero))
        logits = dots.sum(2)
    if not keys.quantized:
        return logits
    # one group over the head dim (more per part were dequantized): s * (q.c) + sum(q) * z, two in-place ops
    return logits.mul_(keys.scale).addcmul_(_q_sums(qs, 1, q_sums), keys.zero)


def _q_sums(qs: torch.Tensor, groups: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """sum(q) per group of the head dim: (B, Hkv, R, G), computed once per call and group count."""
    if groups not in cache:
        cache[groups] = qs.view(*qs.shape[:3], groups, -1).sum(-1)
    return cache[groups]


def _add_value_sum(acc: torch.Tensor | None, probs: torch.Tensor, values: _Field) -> torch.Tensor:
    """acc (B, Hkv, R, D) + sum_t probs * v_t for unnormalised probs (B, Hkv, R, T), from the codes: per part,
    (p * s) @ c + p @ z; the first store's sum becomes the accumulator (acc None)."""
    b, h, rows, _ = probs.shape
    n_parts = values.n_parts
    weights = probs.unsqueeze(2)
    if values.quantized:
        weights = weights * values.part_scales()  # (B, Hkv, P or 1, R, T)
    part = _codes_matmul(weights, values, False)  # (B, Hkv, P, R, W)
    if n_parts == 1:
        acc = part[:, :, 0] if acc is None else acc.add_(part[:, :, 0])
    elif acc is None:
        acc = part.transpose(2, 3).reshape(b, h, rows, -1)
    else:
        acc.view(b, h, rows, n_parts, -1).transpose(2, 3).add_(part)
    if values.quantized:
        zeros = torch.matmul(probs, values.zero.transpose(-1, -2))  # (B, Hkv, R, G)
        acc.view(b, h, rows, zeros.shape[-1], -1).add_(zeros.unsqueeze(-1))
    return acc


def _attend(
    q: torch.Tensor, stores: tuple[KVStore, ...], sm_scale: float, scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Q, D) over every store, one softmax over all their logits -> out (B, Hq, Q, D) float32,
    natural-log lse (B, Hq, Q); empty rows give 0 and -inf. Query rows are processed in blocks (extend)."""
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads = stores[0].k.shape[1]
    group = q_heads // kv_heads
    rows = group * num_queries
    if scores is None:  # (the scores' columns follow the stores one by one)
        stores = _join_plain_stores(stores, batch)
    spans = [_span(store, batch, q.device) for store in stores]
    fields = []
    for store, span in zip(stores, spans):
        sliced = _one_page_per_row(store, span.end)
        fields.append((_Field(store, "k", span, sliced), _Field(store, "v", span, sliced)))
    total = sum(span.end - span.begin for span in spans)
    # a row can attend nothing only with per-row bounds or a causal store; otherwise the max needs no -inf guard
    may_be_empty = total == 0 or any(span.valid is not None or store.causal for store, span in zip(stores, spans))
    qs = (q.float() * sm_scale).reshape(batch, kv_heads, rows, head_dim)
    out = torch.empty(batch, kv_heads, rows, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, kv_heads, rows, dtype=torch.float32, device=q.device)
    block = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, batch * kv_heads * total))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        q_sums: dict[int, torch.Tensor] = {}
        logits = []
        for store, span, (keys, _) in zip(stores, spans, fields):
            rotated = store.k_rotation is not None
            part = _key_logits(_rotated_queries(qs[:, :, r0:r1], store), keys, {} if rotated else q_sums,
                               span.end - span.begin)
            if span.valid is not None:
                part.masked_fill_(~span.valid[:, None, None, :], -math.inf)
            if store.causal:  # rows are (head, query) pairs, query-minor
                query_index = torch.arange(r0, r1, device=q.device) % num_queries
                positions = torch.arange(span.begin, span.end, device=q.device)
                part.masked_fill_(positions[None, :] > query_index[:, None], -math.inf)
            logits.append(part)
        if scores is not None:
            _write_logits(scores, logits, spans, score_offsets)
        joined = logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)
        top = joined.amax(dim=-1, keepdim=True) if total else joined.new_zeros(*joined.shape[:-1], 1)
        if may_be_empty:
            top = top.masked_fill_(top == -math.inf, 0.0)
        probs = joined.sub_(top).exp_()
        mass = probs.sum(dim=-1, keepdim=True)
        acc, offset = None, 0
        for store, (_, values), span in zip(stores, fields, spans):
            width = span.end - span.begin
            if store.v_rotation is None:
                acc = _add_value_sum(acc, probs[..., offset : offset + width], values)
            else:  # the store's values are v @ R: rotate its share back
                part = _add_value_sum(None, probs[..., offset : offset + width], values) @ store.v_rotation.T
                acc = part if acc is None else acc.add_(part)
            offset += width
        torch.add(top.squeeze(-1), mass.squeeze(-1).log(), out=lse[:, :, r0:r1])
        if may_be_empty:  # empty rows: acc is 0, so out is 0
            mass.clamp_min_(torch.finfo(torch.float32).tiny)
        torch.div(acc, mass, out=out[:, :, r0:r1])
    return out.view(batch, q_heads, num_queries, head_dim), lse.view(batch, q_heads, num_queries)


def is_plain(store: KVStore) -> bool:
    """A 16-bit store that every row attends over the same int span, unrotated and not causal."""
    return (store.k_bits == store.v_bits == 16 and store.k_rotation is None and store.v_rotation is None
            and not store.causal and not isinstance(store.kv_start, torch.Tensor)
            and not isinstance(store.kv_end, torch.Tensor))


def _join_plain_stores(stores: tuple[KVStore, ...], batch: int) -> tuple[KVStore, ...]:
    """Plain 16-bit stores (the fp sinks and window around a quantized middle) read as one float32 store over their
    concatenated tokens, in place of the first of them: one matmul each for keys and values instead of one per
    store (the softmax is over all stores anyway)."""
    plain = [i for i, store in enumerate(stores) if is_plain(store)]
    if len(plain) < 2:
        return stores
    keys, values = [], []
    for i in plain:
        store = stores[i]
        span = _span(store, batch, store.k.device)
        sliced = _one_page_per_row(store, span.end)
        keys.append(_tokens(store.k, store, span, sliced).float())  # (float32 anyway once read)
        values.append(_tokens(store.v, store, span, sliced).float())
    table = torch.arange(batch, dtype=torch.int32, device=keys[0].device)[:, None]
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    joined = KVStore(k=k, v=v, block_table=table, kv_end=k.shape[2])
    return tuple(joined if i == plain[0] else store for i, store in enumerate(stores) if i not in plain[1:])


def _rotated_queries(qs: torch.Tensor, store: KVStore) -> torch.Tensor:
    """Queries in the frame of the store's keys: q @ Rk when they were stored rotated (q.k is then unchanged)."""
    return qs if store.k_rotation is None else qs @ store.k_rotation


def _write_logits(scores: torch.Tensor, logits: list[torch.Tensor], spans: list[_Span], offsets) -> None:
    """Decode: each attended token's logit in the log2 domain at column offset + token (other columns kept)."""
    batch, q_heads = scores.shape[:2]
    for part, span, offset in zip(logits, spans, offsets):
        columns = scores[:, :, offset + span.begin : offset + span.end]
        values = part.reshape(batch, q_heads, -1) * LOG2E
        if span.valid is None:
            columns.copy_(values)
        else:
            columns.copy_(torch.where(span.valid[:, None, :], values, columns))


def extend_attention_multi_reference(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Q, D) over 1..MAX_STORES stores, exactly merged -> out (B, Hq, Q, D) float32 (or `out_dtype`),
    natural-log lse (B, Hq, Q) float32. `num_splits` only tunes the Triton kernel."""
    check_stores(q, stores)
    check_extend_query(q)
    out, lse = _attend(q, tuple(stores), sm_scale)
    return (out if out_dtype is None else out.to(out_dtype)), lse


def decode_attention_multi_reference(
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
    check_stores(q, stores)
    check_decode_query(q)
    check_score_args(q, stores, scores, score_offsets)
    out, lse = _attend(q[:, :, None], tuple(stores), sm_scale, scores, score_offsets)
    out = out[:, :, 0]
    return (out if out_dtype is None else out.to(out_dtype)), lse[:, :, 0]
