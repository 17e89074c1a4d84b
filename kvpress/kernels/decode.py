"""The split-K body every attention kernel runs (one program: BLOCK_M query rows of one kv head over one split of
one store's tokens, dequantized in registers), the combine kernel that merges split partials, and launch helpers.
The multi-store kernel (kernels/multi.py) calls the body once per store; its torch twin is kernels/reference.py.

Layout and dequantization follow docs/STORAGE_LAYOUT.md. Work is done in two halves of the head dim so that
split-halves packed 4-bit fields dequantize in registers without any interleaving. How tokens are addressed (one page
per row / power-of-two pages / any page size) is a compile-time choice per store, made from shapes only
(store_access.store_addressing).
"""
from functools import lru_cache
from typing import NamedTuple

import torch

from kvpress.kernels.tile_loads import load_channel_halves, load_token_halves, row_page, token_pages, token_rows
from kvpress.kernels.triton_compat import next_power_of_2, tl, triton

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


class StorePointers(NamedTuple):
    """The runtime arguments of one store in a launch (a tuple argument of the kernel): field pointers (ints 0 for
    the scales of a 16-bit field, never read), their (page, head, slot, column) strides, the block table's row
    stride, the page size and the store's first logit column (scores=)."""

    k: object
    v: object
    k_scale: object
    k_zero: object
    v_scale: object
    v_zero: object
    table: object
    k_strides: tuple
    k_scale_strides: tuple
    v_strides: tuple
    v_scale_strides: tuple
    table_stride: int
    page_size: int
    score_offset: int


class StoreEncoding(NamedTuple):
    """The compile-time constants of one store in a launch (a constexpr tuple argument of the kernel): bits and
    groups, dot operand dtype / fp32 input precision / fp16 dequantization (dot_operand_type), whether its start /
    end bounds are (B,) tensors or ints, its addressing (store_access.store_addressing), causality, and k_block: the
    token block of keys quantized per channel (KVStore.k_block; 0 = per token; such a store is contiguous)."""

    k_bits: int
    v_bits: int
    k_group: int
    v_group: int
    dot_dtype: object
    precision: str
    fp16_codes: bool
    start_per_row: bool
    end_per_row: bool
    contiguous: bool
    page_shift: int
    causal: bool
    k_block: int


class OutputPointers(NamedTuple):
    """Where a program writes: q (B, Hq, Q, D), the partial outputs (B, Hq, Q, splits, D) and lses
    (B, Hq, Q, splits), their strides, and the optional logits (B, Hq, L) with (batch, head) strides.

    The three pointers come before the strides on purpose: this order is the kernel's parameter layout, and with
    each pointer followed by its strides ptxas (sm_90) allocates registers worse in the tile loop (4 more loop
    instructions for d128 int8-K / int4-V paged16, eval/results/kernel_instructions_issue12.json)."""

    q: object
    out: object
    lse: object
    q_strides: tuple
    out_strides: tuple
    lse_strides: tuple
    scores: object
    score_strides: tuple


@triton.jit
def attend_split(
    io, store, b, kv_head, pid_m, start, end, split, num_splits, out_split, group, num_queries, qk_scale,
    ENC: tl.constexpr, HALF: tl.constexpr, HALF_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORES: tl.constexpr,
):  # fmt: skip
    """BLOCK_M query rows (tile pid_m of kv head `kv_head` of row b) over split `split` of `num_splits` of the row's
    tokens [start, end) (start <= end) of one store (`store`: StorePointers, ENC: StoreEncoding); the partial goes to
    split column `out_split` of the outputs (`io`: OutputPointers).
    SCORES (decode, one query per row): also store each tile's log2-domain logits of head h at
    scores + b * stride_b + h * stride_h + score_offset + token (float32), for H2O's attention mass.
    ENC.causal (a prefill chunk attending its own tokens): a row of query i sees tokens j <= i only, and the program
    stops at the tile past its last query. ENC.k_block: keys quantized per channel over blocks of that many tokens,
    dequantized with their block's scales in slot layout (tile_loads.load_channel_halves).

    Addressing (ENC.contiguous, ENC.page_shift: tile_loads.token_pages) is specialised at compile time; the per-row
    and per-head parts of every field's address are computed once, before the tile loop. Each half of the head dim
    (HALF columns) is a tile of HALF_TILE >= HALF columns (a power of two): when they differ (head_dim 80, 96) the
    columns past HALF are masked (q reads 0 there, nothing is stored); when equal no mask is compiled."""
    stride_qb, stride_qh, stride_qq, stride_qd = io.q_strides
    stride_kp, stride_kh, stride_ks, stride_kx = store.k_strides
    stride_ksp, stride_ksh, stride_kss, stride_ksg = store.k_scale_strides
    stride_vp, stride_vh, stride_vs, stride_vx = store.v_strides
    stride_vsp, stride_vsh, stride_vss, stride_vsg = store.v_scale_strides
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < group * num_queries
    heads = kv_head * group + rows // num_queries
    queries = rows % num_queries
    cols = tl.arange(0, HALF_TILE)
    io_mask = row_mask[:, None]
    if HALF_TILE != HALF:  # padded head dim: the columns past HALF read 0 and are never stored
        io_mask = io_mask & (cols < HALF)[None, :]
    q_rows = io.q + b * stride_qb + heads * stride_qh + queries * stride_qq
    q_low = tl.load(q_rows[:, None] + cols[None, :] * stride_qd, mask=io_mask, other=0)
    q_high = tl.load(q_rows[:, None] + (cols[None, :] + HALF) * stride_qd, mask=io_mask, other=0)
    q_low = q_low.to(ENC.dot_dtype)
    q_high = q_high.to(ENC.dot_dtype)

    per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)
    if ENC.causal:
        hi = tl.minimum(hi, tl.max(tl.where(row_mask, queries, -1)) + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_low = tl.zeros([BLOCK_M, HALF_TILE], tl.float32)
    acc_high = tl.zeros([BLOCK_M, HALF_TILE], tl.float32)
    table_row = b.to(tl.int64) * store.table_stride
    page0 = row_page(store.table, table_row, ENC.contiguous)  # the row's one page, or 0
    head = kv_head.to(tl.int64)
    k_base = store.k + (page0 * stride_kp + head * stride_kh)
    ks_offset = page0 * stride_ksp + head * stride_ksh  # scale and zero share their strides
    ks_base = store.k_scale + ks_offset
    kz_base = store.k_zero + ks_offset
    v_base = store.v + (page0 * stride_vp + head * stride_vh)
    vs_offset = page0 * stride_vsp + head * stride_vsh
    vs_base = store.v_scale + vs_offset
    vz_base = store.v_zero + vs_offset
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        token_mask = tokens < hi
        page, slot = token_pages(store.table, table_row, tokens, token_mask, store.page_size, ENC.contiguous,
                                 ENC.page_shift)  # fmt: skip
        k_rows = token_rows(page, slot, stride_kp, stride_ks, ENC.contiguous)
        if ENC.k_block:  # per-channel keys (contiguous store: a slot is the token)
            tl.static_assert(ENC.contiguous, "per-channel keys need a contiguous store")
            k_low, k_high = load_channel_halves(
                k_base, ks_base, kz_base, k_rows, slot, stride_kx, stride_kss, stride_ksg, token_mask,
                HALF, HALF_TILE, ENC.k_bits, ENC.k_block, ENC.dot_dtype, ENC.fp16_codes,
            )  # fmt: skip
        else:
            ks_rows = token_rows(page, slot, stride_ksp, stride_kss, ENC.contiguous, True)
            k_low, k_high = load_token_halves(
                k_base, ks_base, kz_base, k_rows, ks_rows, stride_kx, stride_ksg, token_mask,
                HALF, HALF_TILE, ENC.k_bits, ENC.k_group, ENC.dot_dtype, ENC.fp16_codes,
            )  # fmt: skip
        scores = tl.dot(q_low, tl.trans(k_low), input_precision=ENC.precision)
        scores += tl.dot(q_high, tl.trans(k_high), input_precision=ENC.precision)
        scores = tl.where(token_mask[None, :], scores * qk_scale, float("-inf"))
        if ENC.causal:
            scores = tl.where(tokens[None, :] <= queries[:, None], scores, float("-inf"))
        if SCORES:
            stride_sb, stride_sh = io.score_strides
            score_rows = io.scores + b.to(tl.int64) * stride_sb + heads.to(tl.int64) * stride_sh + store.score_offset
            tl.store(score_rows[:, None] + tokens[None, :], scores, mask=row_mask[:, None] & token_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        v_rows = token_rows(page, slot, stride_vp, stride_vs, ENC.contiguous)
        vs_rows = token_rows(page, slot, stride_vsp, stride_vss, ENC.contiguous, True)
        v_low, v_high = load_token_halves(
            v_base, vs_base, vz_base, v_rows, vs_rows, stride_vx, stride_vsg, token_mask,
            HALF, HALF_TILE, ENC.v_bits, ENC.v_group, ENC.dot_dtype, ENC.fp16_codes,
        )  # fmt: skip
        probs = probs.to(ENC.dot_dtype)
        acc_low = acc_low * alpha[:, None] + tl.dot(probs, v_low, input_precision=ENC.precision)
        acc_high = acc_high * alpha[:, None] + tl.dot(probs, v_high, input_precision=ENC.precision)
        m_i = m_new

    nonempty = l_i > 0
    inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    stride_ob, stride_oh, stride_oq, stride_osplit, stride_od = io.out_strides
    stride_lb, stride_lh, stride_lq, stride_lsplit = io.lse_strides
    o_rows = io.out + b * stride_ob + heads * stride_oh + queries * stride_oq + out_split * stride_osplit
    tl.store(o_rows[:, None] + cols[None, :] * stride_od, acc_low * inv_l[:, None], mask=io_mask)
    tl.store(o_rows[:, None] + (cols[None, :] + HALF) * stride_od, acc_high * inv_l[:, None], mask=io_mask)
    l_rows = io.lse + b * stride_lb + heads * stride_lh + queries * stride_lq + out_split * stride_lsplit
    tl.store(l_rows, lse, mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per query row: log-sum-exp merge of its contiguous (splits, D) partials into (D,) and lse. The
    head dim is a tile of BLOCK_D (a power of two >= HEAD_DIM): the columns past HEAD_DIM are masked (no mask is
    compiled when they are equal)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    part_lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    m = tl.max(part_lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(part_lse - m_safe)
    total = tl.sum(weights, 0)
    dims = tl.arange(0, BLOCK_D)
    part_mask = split_mask[:, None]
    dim_mask = None
    if BLOCK_D != HEAD_DIM:
        dim_mask = dims < HEAD_DIM
        part_mask = part_mask & dim_mask[None, :]
    parts = tl.load(
        part_out_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :],
        mask=part_mask,
        other=0.0,
    )
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, merged, mask=dim_mask)
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


def combine_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge contiguous split partials (..., splits, D) / (..., splits) into contiguous out (..., D) / lse (...)
    with one launch of the combine kernel (one program per query row)."""
    splits, head_dim = part_out.shape[-2:]
    _combine_splits_kernel[(lse.numel(),)](
        part_out, part_lse, out, lse, splits, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
        BLOCK_S=next_power_of_2(splits), num_warps=4,
    )
