"""Attention of query rows over the (quantized, paged) KV store: the torch twin and the split-K Triton kernel that
both decode (one query per row) and extend (a chunk of queries) run on (argument checks and page gathering live in
store_access.py).

Layout and dequantization follow docs/STORAGE_LAYOUT.md. Work is done in two halves of the head dim so
that split-halves packed 4-bit fields dequantize in registers without any interleaving. How tokens are addressed
(one page per row / power-of-two pages / any page size) is a compile-time choice per store, made from shapes only
(store_access.store_addressing).

Two ways to apply a quantized field's affine x = code * scale + zero (KVPRESS_DEQUANT, read at every call):
"registers" (default) dequantizes every (BLOCK_N, D) tile element before the dots; "factored" feeds the raw
codes (exact in fp16) to the dots and applies scale and zero per token and group to the much smaller score /
probability tiles (see factored_fields for which group configurations use it).
"""
import math
from functools import lru_cache

import torch

from kvpress.kernels.factored import (
    factored_key_scores,
    factored_query,
    factored_value_output,
    factored_value_update,
    dequant_mode,
    factored_fields,
)
from kvpress.kernels.store_access import check_store_args, gather_dequantized, store_addressing, token_span
from kvpress.kernels.tile_loads import load_token_halves, row_page, token_pages, token_rows
from kvpress.kernels.triton_compat import cdiv, next_power_of_2, require_triton, tl, triton



LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
REFERENCE_CHUNK_ELEMENTS = 1 << 25  # score elements per chunk of query rows in the torch twins


def store_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
    *,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin: q (B, Hq, Q, D) attends, unmasked, to stored tokens [kv_start, kv_end) of its row.

    Returns out (B, Hq, Q, D) float32 and natural-log lse (B, Hq, Q); empty rows give out 0, lse -inf.
    Vectorised over tokens; query rows are processed in chunks to bound the score matrix. `causal`: query i
    also sees only tokens j <= i (a prefill chunk attending its own tokens, stored as tokens 0..Q-1).
    """
    geo = check_store_args(
        q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, k_bits, v_bits, k_group, v_group
    )
    batch, q_heads, num_queries, head_dim = q.shape
    out = torch.zeros(batch, q_heads, num_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, q_heads, num_queries), -math.inf, dtype=torch.float32, device=q.device)
    t_begin, t_end = token_span(kv_start, kv_end, block_table, geo.page_size)
    if t_end <= t_begin or out.numel() == 0:
        return out, lse
    keys = gather_dequantized(k, k_scale, k_zero, block_table, t_begin, t_end, k_bits, geo.k_group)
    values = gather_dequantized(v, v_scale, v_zero, block_table, t_begin, t_end, v_bits, geo.v_group)
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
        if causal:  # rows are (head, query) pairs, query-minor
            query_index = torch.arange(r0, min(r0 + chunk, rows), device=q.device) % num_queries
            scores.masked_fill_(positions[None, :] > query_index[:, None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(torch.nan_to_num(row_lse, neginf=0.0).unsqueeze(-1)).exp_()
        out_rows[:, :, r0 : r0 + chunk] = torch.matmul(probs, values)
        lse_rows[:, :, r0 : r0 + chunk] = row_lse
    return out, lse


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of decode: one query per row and head, q (B, Hq, D) -> out (B, Hq, D), lse (B, Hq) float32."""
    _check_decode_query(q)
    out, lse = store_attention_reference(
        q.unsqueeze(2), k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
        sm_scale, k_bits, v_bits, k_group, v_group,
    )  # fmt: skip
    return out.squeeze(2), lse.squeeze(2)


def _check_decode_query(q: torch.Tensor) -> None:
    """Decode takes one query per row and head: q must be (B, Hq, D)."""
    if q.dim() != 3:
        raise ValueError(f"decode q must be shaped (B, Hq, D); got {tuple(q.shape)} (use extend_attention for Q>1)")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def attend_split(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kx,
    stride_ksp, stride_ksh, stride_kss, stride_ksg,
    stride_vp, stride_vh, stride_vs, stride_vx,
    stride_vsp, stride_vsh, stride_vss, stride_vsg,
    stride_tb,
    stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
    stride_lb, stride_lh, stride_lq, stride_lsplit,
    b, kv_head, pid_m, start, end, split, num_splits, out_split,
    group, num_queries, page_size, qk_scale,
    score_ptr, stride_sb, stride_sh, score_offset,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP16_CODES: tl.constexpr,
    FACTOR_K: tl.constexpr, FACTOR_V: tl.constexpr, CONTIGUOUS: tl.constexpr, PAGE_SHIFT: tl.constexpr,
    SCORES: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """The body of one split-K program, shared by the one-store and the multi-store (kernels/multi.py) kernels:
    BLOCK_M query rows (tile pid_m of kv head `kv_head` of row b) over split `split` of `num_splits` of the row's
    tokens [start, end) (start <= end); the partial goes to split column `out_split` of out / lse.
    SCORES (decode, one query per row): also store each tile's log2-domain logits of head h at
    score_ptr + b * stride_sb + h * stride_sh + score_offset + token (float32), for H2O's attention mass.
    CAUSAL (a prefill chunk attending its own tokens): a row of query i sees tokens j <= i only, and the program
    stops at the tile past its last query.

    Addressing (CONTIGUOUS, PAGE_SHIFT: tile_loads.token_pages) is specialised at compile time; the per-row and
    per-head parts of every field's address are computed once, before the tile loop."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < group * num_queries
    heads = kv_head * group + rows // num_queries
    queries = rows % num_queries
    cols = tl.arange(0, HALF)
    q_rows = q_ptr + b * stride_qb + heads * stride_qh + queries * stride_qq
    q_low = tl.load(q_rows[:, None] + cols[None, :] * stride_qd, mask=row_mask[:, None], other=0)
    q_high = tl.load(q_rows[:, None] + (cols[None, :] + HALF) * stride_qd, mask=row_mask[:, None], other=0)
    q_low = q_low.to(DOT_DTYPE)
    q_high = q_high.to(DOT_DTYPE)
    if FACTOR_K:
        q_low, qsum_low = factored_query(q_low, HALF, K_GROUP)
        q_high, qsum_high = factored_query(q_high, HALF, K_GROUP)

    per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)
    if CAUSAL:
        hi = tl.minimum(hi, tl.max(tl.where(row_mask, queries, -1)) + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if FACTOR_V and V_GROUP < HALF:
        acc_low = tl.zeros([HALF // V_GROUP, BLOCK_M, V_GROUP], tl.float32)
        acc_high = tl.zeros([HALF // V_GROUP, BLOCK_M, V_GROUP], tl.float32)
        zacc_low = tl.zeros([HALF // V_GROUP, BLOCK_M], tl.float32)
        zacc_high = tl.zeros([HALF // V_GROUP, BLOCK_M], tl.float32)
    else:
        acc_low = tl.zeros([BLOCK_M, HALF], tl.float32)
        acc_high = tl.zeros([BLOCK_M, HALF], tl.float32)
        zacc_low = tl.zeros([BLOCK_M], tl.float32)  # value zeros times probabilities (factored V only)
        zacc_high = tl.zeros([BLOCK_M], tl.float32)
    table_row = b.to(tl.int64) * stride_tb
    page0 = row_page(table_ptr, table_row, CONTIGUOUS)  # the row's one page, or 0
    head = kv_head.to(tl.int64)
    k_base = k_ptr + (page0 * stride_kp + head * stride_kh)
    ks_offset = page0 * stride_ksp + head * stride_ksh  # scale and zero share their strides
    ks_base = ks_ptr + ks_offset
    kz_base = kz_ptr + ks_offset
    v_base = v_ptr + (page0 * stride_vp + head * stride_vh)
    vs_offset = page0 * stride_vsp + head * stride_vsh
    vs_base = vs_ptr + vs_offset
    vz_base = vz_ptr + vs_offset
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        token_mask = tokens < hi
        page, slot = token_pages(table_ptr, table_row, tokens, token_mask, page_size, CONTIGUOUS, PAGE_SHIFT)
        k_rows = token_rows(page, slot, stride_kp, stride_ks, CONTIGUOUS)
        ks_rows = token_rows(page, slot, stride_ksp, stride_kss, CONTIGUOUS, not FACTOR_K)
        if FACTOR_K:
            scores = factored_key_scores(
                q_low, q_high, qsum_low, qsum_high, k_base, ks_base, kz_base, k_rows, ks_rows, stride_kx, stride_ksg,
                token_mask, qk_scale, HALF, K_BITS, K_GROUP, DOT_DTYPE, PRECISION, FP16_CODES,
            )
            scores = tl.where(token_mask[None, :], scores, float("-inf"))
        else:
            k_low, k_high = load_token_halves(
                k_base, ks_base, kz_base, k_rows, ks_rows, stride_kx, stride_ksg, token_mask,
                HALF, K_BITS, K_GROUP, DOT_DTYPE, FP16_CODES,
            )
            scores = tl.dot(q_low, tl.trans(k_low), input_precision=PRECISION)
            scores += tl.dot(q_high, tl.trans(k_high), input_precision=PRECISION)
            scores = tl.where(token_mask[None, :], scores * qk_scale, float("-inf"))
        if CAUSAL:
            scores = tl.where(tokens[None, :] <= queries[:, None], scores, float("-inf"))
        if SCORES:
            score_rows = score_ptr + b.to(tl.int64) * stride_sb + heads.to(tl.int64) * stride_sh + score_offset
            tl.store(score_rows[:, None] + tokens[None, :], scores, mask=row_mask[:, None] & token_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        v_rows = token_rows(page, slot, stride_vp, stride_vs, CONTIGUOUS)
        vs_rows = token_rows(page, slot, stride_vsp, stride_vss, CONTIGUOUS, not FACTOR_V)
        if FACTOR_V:
            acc_low, acc_high, zacc_low, zacc_high = factored_value_update(
                acc_low, acc_high, zacc_low, zacc_high, probs, alpha,
                v_base, vs_base, vz_base, v_rows, vs_rows, stride_vx, stride_vsg, token_mask,
                HALF, V_BITS, V_GROUP, DOT_DTYPE, PRECISION, FP16_CODES,
            )
        else:
            v_low, v_high = load_token_halves(
                v_base, vs_base, vz_base, v_rows, vs_rows, stride_vx, stride_vsg, token_mask,
                HALF, V_BITS, V_GROUP, DOT_DTYPE, FP16_CODES,
            )
            probs = probs.to(DOT_DTYPE)
            acc_low = acc_low * alpha[:, None] + tl.dot(probs, v_low, input_precision=PRECISION)
            acc_high = acc_high * alpha[:, None] + tl.dot(probs, v_high, input_precision=PRECISION)
        m_i = m_new

    if FACTOR_V:
        acc_low, acc_high = factored_value_output(acc_low, acc_high, zacc_low, zacc_high, HALF, V_GROUP)

    nonempty = l_i > 0
    inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_rows = out_ptr + b * stride_ob + heads * stride_oh + queries * stride_oq + out_split * stride_osplit
    tl.store(o_rows[:, None] + cols[None, :] * stride_od, acc_low * inv_l[:, None], mask=row_mask[:, None])
    tl.store(o_rows[:, None] + (cols[None, :] + HALF) * stride_od, acc_high * inv_l[:, None], mask=row_mask[:, None])
    l_rows = lse_ptr + b * stride_lb + heads * stride_lh + queries * stride_lq + out_split * stride_lsplit
    tl.store(l_rows, lse, mask=row_mask)


@triton.jit
def _split_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, start_ptr, end_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kp, stride_kh, stride_ks, stride_kx,
    stride_ksp, stride_ksh, stride_kss, stride_ksg,
    stride_vp, stride_vh, stride_vs, stride_vx,
    stride_vsp, stride_vsh, stride_vss, stride_vsg,
    stride_tb,
    stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
    stride_lb, stride_lh, stride_lq, stride_lsplit,
    kv_heads, group, num_queries, page_size, num_splits, qk_scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP16_CODES: tl.constexpr,
    FACTOR_K: tl.constexpr = False, FACTOR_V: tl.constexpr = False,
    CONTIGUOUS: tl.constexpr = False, PAGE_SHIFT: tl.constexpr = -1, CAUSAL: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_M query rows (GQA heads x queries of one kv head) over one split of the row's tokens.

    Writes the split's normalised partial output and its natural-log lse (out 0 / lse -inf when empty).
    FACTOR_K / FACTOR_V: apply that field's affine to the scores / probabilities instead of to its tile
    (factored dequantization, see factored_fields); both False is the register-dequantization kernel.
    CONTIGUOUS / PAGE_SHIFT: the store's addressing (store_access.store_addressing; the defaults are the general
    paged path, right for any store).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    attend_split(
        q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qq, stride_qd,
        stride_kp, stride_kh, stride_ks, stride_kx,
        stride_ksp, stride_ksh, stride_kss, stride_ksg,
        stride_vp, stride_vh, stride_vs, stride_vx,
        stride_vsp, stride_vsh, stride_vss, stride_vsg,
        stride_tb,
        stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
        stride_lb, stride_lh, stride_lq, stride_lsplit,
        b, kv_head, pid_m, start, end, split, num_splits, split,
        group, num_queries, page_size, qk_scale,
        q_ptr, 0, 0, 0,  # no score output
        HALF, BLOCK_M, BLOCK_N, K_BITS, V_BITS, K_GROUP, V_GROUP, DOT_DTYPE, PRECISION, FP16_CODES, FACTOR_K, FACTOR_V,
        CONTIGUOUS, PAGE_SHIFT, False, CAUSAL,
    )  # fmt: skip


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per query row: log-sum-exp merge of its contiguous (splits, D) partials into (D,) and lse."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    part_lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    m = tl.max(part_lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(part_lse - m_safe)
    total = tl.sum(weights, 0)
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(
        part_out_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, merged)
    tl.store(lse_ptr + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


@lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to aim for so every SM has a few split-K programs in flight (small under the interpreter)."""
    if device.type == "cuda":
        return 8 * _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def dot_operand_type(q: torch.Tensor, fields: list[tuple[torch.Tensor, int]]) -> tuple[object, str, bool]:
    """(dot operand dtype, fp32 input precision, dequantize-in-fp16 flag) for q and the (field, bits) read.

    fp32 q: exact fp32 dots ("ieee"). Half q: fp16 operands with fp32 accumulation, and quantized codes are
    dequantized in fp16 (no conversion instructions). bf16 q also uses fp16 operands (exact for |q| in
    [6e-5, 65504]) unless a stored fp field is not fp16, in which case it stays bf16 - or fp32 on CPU, since
    the Triton interpreter's bf16 dot is wrong (triton 3.9).
    """
    if q.dtype == torch.float32:
        return tl.float32, "ieee", False
    if q.dtype == torch.float16 or all(bits < 16 or f.dtype == torch.float16 for f, bits in fields):
        return tl.float16, "tf32", True
    return (tl.bfloat16, "tf32", False) if q.is_cuda else (tl.float32, "ieee", False)


def scale_pointer_args(scale: torch.Tensor | None, field: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pointer stand-ins and strides for an optional scale/zero pair (unquantized stores have none)."""
    if scale is None:
        return field, (0, 0, 0, 0)
    return scale, tuple(scale.stride())


def check_triton_head_dim(head_dim: int) -> None:
    """The Triton kernels tile each half of the head dim as one power-of-two block of at least 16."""
    half = head_dim // 2
    if half < 16 or half & (half - 1):
        raise ValueError(
            f"Triton kernels need head_dim a power of two >= 32; got {head_dim} (use KVPRESS_KERNELS=reference)"
        )


def store_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dequant: str | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of store_attention_reference (q (B, Hq, Q, D), `causal` alike); tile sizes and split count are
    tunable.

    Rows of one program are (GQA head, query) pairs of one kv head, so each K/V tile is loaded once per
    group. Splits > 1 write partials that a second kernel merges. `dequant` ("registers" | "factored", default
    $KVPRESS_DEQUANT or "registers") picks how quantized tiles are dequantized (see factored_fields).
    """
    require_triton()
    geo = check_store_args(
        q, k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, k_bits, v_bits, k_group, v_group
    )
    check_triton_head_dim(geo.head_dim)
    batch, q_heads, num_queries, head_dim = q.shape
    out = torch.empty(batch, q_heads, num_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, num_queries, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    rows = geo.group * num_queries
    block_m = block_m or max(16, min(64, next_power_of_2(rows)))
    block_n = block_n or (64 if block_m > 16 and head_dim <= 128 else 32)
    m_tiles = cdiv(rows, block_m)
    capacity = block_table.shape[1] * geo.page_size
    if num_splits is None:
        wanted = cdiv(_target_programs(q.device), batch * geo.kv_heads * m_tiles)
        num_splits = max(1, min(wanted, cdiv(capacity, 4 * block_n), _MAX_SPLITS))
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(3), lse.unsqueeze(3)
    else:
        part_out = torch.empty(batch, q_heads, num_queries, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, q_heads, num_queries, num_splits, dtype=torch.float32, device=q.device)
    ks, ks_strides = scale_pointer_args(k_scale, k)
    kz, _ = scale_pointer_args(k_zero, k)
    vs, vs_strides = scale_pointer_args(v_scale, v)
    vz, _ = scale_pointer_args(v_zero, v)
    dot_dtype, precision, fp16_codes = dot_operand_type(q, [(k, k_bits), (v, v_bits)])
    factor_k, factor_v = factored_fields(dequant_mode(dequant), head_dim, k_bits, v_bits, geo.k_group, geo.v_group)
    contiguous, page_shift = store_addressing(block_table, geo.page_size)
    grid = (batch * geo.kv_heads, m_tiles, num_splits)
    _split_attention_kernel[grid](
        q, k, v, ks, kz, vs, vz, block_table, kv_start, kv_end, part_out, part_lse,
        *q.stride(), *k.stride(), *ks_strides, *v.stride(), *vs_strides, block_table.stride(0),
        *part_out.stride(), *part_lse.stride(),
        geo.kv_heads, geo.group, num_queries, geo.page_size, num_splits, sm_scale * LOG2E,
        HALF=head_dim // 2, BLOCK_M=block_m, BLOCK_N=block_n,
        K_BITS=k_bits, V_BITS=v_bits, K_GROUP=geo.k_group, V_GROUP=geo.v_group,
        DOT_DTYPE=dot_dtype, PRECISION=precision, FP16_CODES=fp16_codes, FACTOR_K=factor_k, FACTOR_V=factor_v,
        CONTIGUOUS=contiguous, PAGE_SHIFT=page_shift, CAUSAL=causal,
        num_warps=num_warps or (4 if block_m * head_dim <= 64 * 128 else 8), num_stages=num_stages or 2,
    )  # fmt: skip
    if num_splits > 1:
        combine_splits(part_out, part_lse, out, lse)
    return out, lse


def combine_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge contiguous split partials (..., splits, D) / (..., splits) into contiguous out (..., D) / lse (...)
    with one launch of the combine kernel (one program per query row)."""
    splits, head_dim = part_out.shape[-2:]
    _combine_splits_kernel[(lse.numel(),)](
        part_out, part_lse, out, lse, splits, HEAD_DIM=head_dim, BLOCK_S=next_power_of_2(splits), num_warps=4
    )


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
    *,
    dequant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding over the store: q (B, Hq, D) -> out (B, Hq, D), lse (B, Hq) float32 (split-K + merge).

    `dequant` as in store_attention_triton (default $KVPRESS_DEQUANT or "registers")."""
    _check_decode_query(q)
    out, lse = store_attention_triton(
        q.unsqueeze(2), k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end,
        sm_scale, k_bits, v_bits, k_group, v_group, dequant=dequant,
    )  # fmt: skip
    return out.squeeze(2), lse.squeeze(2)
