"""Attention mass per stored token, for H2O-style presses: sum over a kv group's query heads and the Q queries
of softmax probabilities exp(q.k * sm_scale - lse), with lse taken from the merged decode/extend outputs.
Reads keys only (values are not needed).
"""
import math

import torch

from kvpress.kernels.decode import (
    LOG2E,
    REFERENCE_CHUNK_ELEMENTS,
    check_triton_head_dim,
    dot_operand_type,
    scale_pointer_args,
)
from kvpress.kernels.tile_loads import load_token_halves, row_page, token_pages, token_rows
from kvpress.kernels.triton_compat import cdiv, next_power_of_2, require_triton, tl, triton
from kvpress.kernels.store_access import check_store_args, gather_dequantized, store_addressing, token_span


def _check_lse(lse: torch.Tensor, q: torch.Tensor) -> None:
    """lse must be float (B, Hq, Q) matching q (B, Hq, Q, D)."""
    if tuple(lse.shape) != tuple(q.shape[:3]) or not lse.is_floating_point():
        raise ValueError(f"lse must be a float tensor shaped (B, Hq, Q) = {tuple(q.shape[:3])}; got {tuple(lse.shape)}")


def attention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    k_group: int | None,
) -> torch.Tensor:
    """Torch twin: (B, Hkv, max(kv_end)) float32 attention mass, zero outside each row's [kv_start, kv_end)."""
    geo = check_store_args(
        q, k, None, k_scale, k_zero, None, None, block_table, kv_start, kv_end, k_bits, 16, k_group, None
    )
    _check_lse(lse, q)
    batch, _, num_queries, head_dim = q.shape
    t_begin, t_end = token_span(kv_start, kv_end, block_table, geo.page_size)
    out = torch.zeros(batch, geo.kv_heads, t_end, dtype=torch.float32, device=q.device)
    if t_end <= t_begin or q.numel() == 0:
        return out
    keys = gather_dequantized(k, k_scale, k_zero, block_table, t_begin, t_end, k_bits, geo.k_group)
    positions = torch.arange(t_begin, t_end, device=q.device)
    valid = (positions[None, :] >= kv_start[:, None]) & (positions[None, :] < kv_end[:, None])
    rows = geo.group * num_queries
    queries = q.float().reshape(batch, geo.kv_heads, rows, head_dim)
    row_lse = lse.float().reshape(batch, geo.kv_heads, rows)
    row_lse = torch.where(row_lse == -math.inf, math.inf, row_lse)  # rows with no keys contribute nothing
    mass = out[:, :, t_begin:]
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, batch * geo.kv_heads * (t_end - t_begin)))
    for r0 in range(0, rows, chunk):
        scores = torch.matmul(queries[:, :, r0 : r0 + chunk], keys.transpose(-1, -2)).mul_(sm_scale)
        mass += scores.sub_(row_lse[:, :, r0 : r0 + chunk, None]).exp_().sum(2)
    mass.masked_fill_(~valid[:, None, :], 0.0)
    return out


def raw_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    k_group: int | None,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Decode logits in the log2 domain, q.k * sm_scale * log2(e), of q (B, Hq, D) against stored tokens
    [t_begin, t_end) (the span of all rows): (t_begin, logits (B, Hq, t_end - t_begin) float32, valid (B, span)
    bool, True inside each row's [kv_start, kv_end)). What the fused decode writes when asked for scores."""
    geo = check_store_args(
        q[:, :, None], k, None, k_scale, k_zero, None, None, block_table, kv_start, kv_end, k_bits, 16, k_group, None
    )
    t_begin, t_end = token_span(kv_start, kv_end, block_table, geo.page_size)
    t_end = max(t_end, t_begin)
    batch, q_heads, head_dim = q.shape
    keys = gather_dequantized(k, k_scale, k_zero, block_table, t_begin, t_end, k_bits, geo.k_group)
    queries = q.float().reshape(batch, geo.kv_heads, geo.group, head_dim)
    logits = torch.matmul(queries, keys.transpose(-1, -2)).mul_(sm_scale * LOG2E).reshape(batch, q_heads, -1)
    positions = torch.arange(t_begin, t_end, device=q.device)
    valid = (positions[None, :] >= kv_start[:, None]) & (positions[None, :] < kv_end[:, None])
    return t_begin, logits, valid


@triton.jit
def _attention_scores_kernel(
    q_ptr, k_ptr, ks_ptr, kz_ptr, table_ptr, start_ptr, end_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kx,
    stride_ksp, stride_ksh, stride_kss, stride_ksg,
    stride_tb,
    stride_lb, stride_lh, stride_lq,
    stride_ob, stride_oh, stride_ot,
    kv_heads, group, num_queries, page_size, num_tokens, qk_scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP16_CODES: tl.constexpr,
    CONTIGUOUS: tl.constexpr = False, PAGE_SHIFT: tl.constexpr = -1,
):  # fmt: skip
    """One program: a BLOCK_N tile of one row's keys (loaded once) against all query rows of its kv group.
    CONTIGUOUS / PAGE_SHIFT: the store's addressing (store_access.store_addressing; the defaults are the general
    paged path, right for any store)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    token_mask = (tokens >= start) & (tokens < end)
    table_row = b.to(tl.int64) * stride_tb
    page0 = row_page(table_ptr, table_row, CONTIGUOUS)  # the row's one page, or 0
    head = kv_head.to(tl.int64)
    k_base = k_ptr + (page0 * stride_kp + head * stride_kh)
    ks_offset = page0 * stride_ksp + head * stride_ksh  # scale and zero share their strides
    page, slot = token_pages(table_ptr, table_row, tokens, token_mask, page_size, CONTIGUOUS, PAGE_SHIFT)
    k_rows = token_rows(page, slot, stride_kp, stride_ks, CONTIGUOUS)
    ks_rows = token_rows(page, slot, stride_ksp, stride_kss, CONTIGUOUS, True)
    k_low, k_high = load_token_halves(
        k_base, ks_ptr + ks_offset, kz_ptr + ks_offset, k_rows, ks_rows, stride_kx, stride_ksg, token_mask,
        HALF, K_BITS, K_GROUP, DOT_DTYPE, FP16_CODES,
    )
    k_low = tl.trans(k_low)
    k_high = tl.trans(k_high)

    tile_start = pid_n * BLOCK_N
    overlaps = (tile_start < end) & (tile_start + BLOCK_N > start)
    total_rows = tl.where(overlaps, group * num_queries, 0)  # skip all work for tiles outside the row
    cols = tl.arange(0, HALF)
    mass = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, total_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < total_rows
        heads = kv_head * group + rows // num_queries
        queries = rows % num_queries
        q_rows = q_ptr + b * stride_qb + heads * stride_qh + queries * stride_qq
        q_low = tl.load(q_rows[:, None] + cols[None, :] * stride_qd, mask=row_mask[:, None], other=0)
        q_high = tl.load(q_rows[:, None] + (cols[None, :] + HALF) * stride_qd, mask=row_mask[:, None], other=0)
        row_lse = tl.load(lse_ptr + b * stride_lb + heads * stride_lh + queries * stride_lq, mask=row_mask, other=0)
        row_lse = row_lse.to(tl.float32)
        scores = tl.dot(q_low.to(DOT_DTYPE), k_low, input_precision=PRECISION)
        scores += tl.dot(q_high.to(DOT_DTYPE), k_high, input_precision=PRECISION)
        keep = row_mask & (row_lse != float("-inf"))
        shift = tl.where(keep, row_lse * 1.4426950408889634, 0.0)
        probs = tl.exp2(scores * qk_scale - shift[:, None])
        probs = tl.where(keep[:, None] & token_mask[None, :], probs, 0.0)
        mass += tl.sum(probs, 0)
    out_tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_offsets = out_ptr + b * stride_ob + kv_head * stride_oh + out_tokens * stride_ot
    tl.store(out_offsets, mass, mask=out_tokens < num_tokens)


def attention_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    k_group: int | None,
) -> torch.Tensor:
    """Triton twin: grid over (row x kv head, key tiles); each program loads its key tile once and loops over
    query rows. Reads max(kv_end) back to the host to size the output."""
    require_triton()
    geo = check_store_args(
        q, k, None, k_scale, k_zero, None, None, block_table, kv_start, kv_end, k_bits, 16, k_group, None
    )
    _check_lse(lse, q)
    check_triton_head_dim(geo.head_dim)
    batch, _, num_queries, head_dim = q.shape
    num_tokens = int(kv_end.max()) if batch else 0
    out = torch.empty(batch, geo.kv_heads, num_tokens, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    rows = geo.group * num_queries
    block_m = max(16, min(64, next_power_of_2(rows)))
    block_n = 64 if head_dim <= 128 else 32
    ks, ks_strides = scale_pointer_args(k_scale, k)
    kz, _ = scale_pointer_args(k_zero, k)
    dot_dtype, precision, fp16_codes = dot_operand_type(q, [(k, k_bits)])
    contiguous, page_shift = store_addressing(block_table, geo.page_size)
    grid = (batch * geo.kv_heads, cdiv(num_tokens, block_n))
    _attention_scores_kernel[grid](
        q, k, ks, kz, block_table, kv_start, kv_end, lse, out,
        *q.stride(), *k.stride(), *ks_strides, block_table.stride(0), *lse.stride(), *out.stride(),
        geo.kv_heads, geo.group, num_queries, geo.page_size, num_tokens, sm_scale * LOG2E,
        HALF=head_dim // 2, BLOCK_M=block_m, BLOCK_N=block_n, K_BITS=k_bits, K_GROUP=geo.k_group,
        DOT_DTYPE=dot_dtype, PRECISION=precision, FP16_CODES=fp16_codes,
        CONTIGUOUS=contiguous, PAGE_SHIFT=page_shift,
        num_warps=4 if block_m * head_dim <= 64 * 128 else 8,
    )  # fmt: skip
    return out
