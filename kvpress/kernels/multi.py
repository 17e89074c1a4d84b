"""Attention over several stores at once: one split-K launch and one combine launch for all of them.

A quantized layer keeps its tokens in up to three stores (fp16 sinks, the quantized middle, the fp16 window), plus a
shared prefix read in place; a prefill chunk also attends to itself, passed as one more (16-bit, causal) store.
The split axis of ONE grid is partitioned among the stores (each gets its own number of splits, about proportional
to its capacity and at least one); a program finds its store from its split index, runs the split-K body
(decode.attend_split) with that store's pointers (a tuple argument) and encoding (a constexpr tuple), and writes its
partial (out, lse) into one shared set of partial buffers that the combine kernel merges exactly (log-sum-exp) -
across splits and stores alike. Stores are KVStore objects (kernels/store.py); rows whose span in a store is empty
get nothing from it (partial lse -inf). The torch twins are in kernels/reference.py.
"""
from __future__ import annotations

import torch

from kvpress.kernels.decode import (
    LOG2E,
    MAX_SPLITS,
    OutputPointers,
    StoreEncoding,
    StorePointers,
    _target_programs,
    attend_split,
    combine_splits,
    dot_operand_type,
)
from kvpress.kernels.launch_plans import LaunchPlan, find_plan, plan_key, remember_plan
from kvpress.kernels.rotation import attend_rotated, has_rotations
from kvpress.kernels.shapes import check_kernel_shapes, half_tile
from kvpress.kernels.store import (
    MAX_STORES,
    KVStore,
    check_bounds,
    check_decode_query,
    check_extend_query,
    check_score_args,
    check_stores,
)
from kvpress.kernels.store_access import store_addressing
from kvpress.kernels.triton_compat import cdiv, next_power_of_2, require_triton, tl, triton


@triton.jit
def _row_bound(bound, b, PER_ROW: tl.constexpr):
    """Row b's bound: loaded from a (B,) tensor when PER_ROW, else the scalar `bound` itself (as int32)."""
    if PER_ROW:
        value = tl.load(bound + b).to(tl.int32)
    else:
        value = (b * 0 + bound).to(tl.int32)
    return value


# Per-store bounds change at every call (a window grows by one token per decode step): scalars that are never
# specialised (Triton specialises ints inside tuple arguments - 1 as a constant, multiples of 16 - and would
# recompile as they move), one (start, end, split_end) triple per store slot.
BOUND_ARGS = [f"{name}{i}" for i in range(MAX_STORES) for name in ("start", "end", "split_end")]


@triton.jit(do_not_specialize=BOUND_ARGS)
def _multi_split_attention_kernel(
    io, stores, kv_heads, group, num_queries, qk_scale,
    start0, end0, split_end0, start1, end1, split_end1, start2, end2, split_end2,
    start3, end3, split_end3, start4, end4, split_end4,
    NUM_STORES: tl.constexpr, ENCODINGS: tl.constexpr, HALF: tl.constexpr, HALF_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORES: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one kv head over one split of one store. Store s (stores[s]:
    StorePointers, ENCODINGS[s]: StoreEncoding) owns grid splits [split_end{s-1}, split_end{s}) (split_end{-1} = 0)
    and attends each row's tokens [start{s}, end{s}) (start clamped into [0, end]); slots >= NUM_STORES are never
    compiled. SCORES: decode programs also store their logits (see attend_split). HALF_TILE: the power-of-two tile
    of each half of the head dim (HALF columns; shapes.half_tile)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    starts = (start0, start1, start2, start3, start4)
    ends = (end0, end1, end2, end3, end4)
    split_ends = (split_end0, split_end1, split_end2, split_end3, split_end4)
    for s in tl.static_range(NUM_STORES):
        if s == 0:
            first = 0
        else:
            first = split_ends[s - 1]
        if (split >= first) & (split < split_ends[s]):
            hi = tl.maximum(_row_bound(ends[s], b, ENCODINGS[s].end_per_row), 0)
            lo = tl.minimum(tl.maximum(_row_bound(starts[s], b, ENCODINGS[s].start_per_row), 0), hi)
            attend_split(
                io, stores[s], b, kv_head, pid_m, lo, hi, split - first, split_ends[s] - first, split,
                group, num_queries, qk_scale, ENCODINGS[s], HALF, HALF_TILE, BLOCK_M, BLOCK_N, SCORES,
            )  # fmt: skip


def multi_split_counts(
    capacities: list[int], programs_per_split: int, block_n: int, target_programs: int
) -> list[int]:
    """Splits per store: enough programs to fill the device, at most one split per 4 * block_n tokens of capacity,
    shared out in proportion to capacity, at least 1 each, at most MAX_SPLITS in all."""
    wanted = cdiv(target_programs, programs_per_split)
    total = max(1, sum(capacities))
    counts = [
        max(1, min(cdiv(cap, 4 * block_n), round(wanted * cap / total), MAX_SPLITS)) for cap in capacities
    ]
    while sum(counts) > MAX_SPLITS:  # trim the largest share (every store keeps one split)
        counts[counts.index(max(counts))] -= 1
    return counts


def multi_tiles(rows: int, head_dim: int) -> tuple[int, int, int]:
    """(block_m, block_n, m_tiles) for `rows` query rows per kv head (GQA group x queries)."""
    block_m = max(16, min(64, next_power_of_2(rows)))
    block_n = 64 if block_m > 16 and head_dim <= 128 else 32
    return block_m, block_n, cdiv(rows, block_m)


def _store_layout(store: KVStore, geo) -> tuple:
    """What a store's StorePointers hold besides its tensors and logit offset: strides (0s for the absent scales
    of a 16-bit field), the block table's row stride and the page size."""
    k_scale_strides = tuple(store.k_scale.stride()) if store.k_scale is not None else (0, 0, 0, 0)
    v_scale_strides = tuple(store.v_scale.stride()) if store.v_scale is not None else (0, 0, 0, 0)
    return (tuple(store.k.stride()), k_scale_strides, tuple(store.v.stride()), v_scale_strides,
            store.block_table.stride(0), geo.page_size)  # fmt: skip


def _store_encoding(store: KVStore, geo, q: torch.Tensor) -> StoreEncoding:
    """A store's compile-time constants for queries q (ValueError for per-channel keys in a store that is not
    contiguous: the kernel finds a block's scales in the row's one page)."""
    dot_dtype, precision, fp16_codes = dot_operand_type(q, [(store.k, store.k_bits), (store.v, store.v_bits)])
    contiguous, page_shift = store_addressing(store.block_table, geo.page_size)
    if store.k_block is not None and not contiguous:
        raise ValueError(f"per-channel keys (k_block={store.k_block}) need a contiguous store (one page per row); "
                         f"got a block table of {store.block_table.shape[1]} columns")
    return StoreEncoding(
        k_bits=store.k_bits, v_bits=store.v_bits, k_group=geo.k_group, v_group=geo.v_group, dot_dtype=dot_dtype,
        precision=precision, fp16_codes=fp16_codes, start_per_row=isinstance(store.kv_start, torch.Tensor),
        end_per_row=isinstance(store.kv_end, torch.Tensor), contiguous=contiguous, page_shift=page_shift,
        causal=store.causal, k_block=store.k_block or 0,
    )  # fmt: skip


def _new_plan(key, q, stores, sm_scale, num_splits, scores, score_offsets) -> LaunchPlan:
    """Check everything and build the launch plan of a (query shape, stores) combination not seen before."""
    geos = check_stores(q, stores)
    check_score_args(q, stores, scores, score_offsets)
    geo = geos[0]
    check_kernel_shapes(geo.head_dim, [(f"store {i} {name}", bits, group) for i, (s, g) in enumerate(zip(stores, geos))
                                       for name, bits, group in (("k", s.k_bits, None if s.k_block else g.k_group),
                                                                 ("v", s.v_bits, g.v_group))])  # fmt: skip
    batch, q_heads, num_queries, head_dim = q.shape
    block_m, block_n, m_tiles = multi_tiles(geo.group * num_queries, head_dim)
    if num_splits is None:
        counts = multi_split_counts([s.capacity for s in stores], batch * geo.kv_heads * m_tiles, block_n,
                                    _target_programs(q.device))  # fmt: skip
    else:
        counts = list(num_splits)
        if len(counts) != len(stores) or min(counts) < 1:
            raise ValueError(f"num_splits needs one count >= 1 per store; got {num_splits} for {len(stores)} stores")
    total = sum(counts)
    # strides of the outputs the calls allocate: (B, Hq, Q, D) / (B, Hq, Q) written in place when one program per
    # row does everything, else the (B, Hq, Q, splits, D) / (B, Hq, Q, splits) partials
    if total == 1:
        out_strides = (q_heads * num_queries * head_dim, num_queries * head_dim, head_dim, 0, 1)
        lse_strides = (q_heads * num_queries, num_queries, 1, 0)
    else:
        out_strides = (q_heads * num_queries * total * head_dim, num_queries * total * head_dim, total * head_dim,
                       head_dim, 1)  # fmt: skip
        lse_strides = (q_heads * num_queries * total, num_queries * total, total, 1)
    split_ends = [sum(counts[: i + 1]) for i in range(len(counts))]
    return remember_plan(key, stores, LaunchPlan(
        refs=(), layouts=tuple(_store_layout(s, g) for s, g in zip(stores, geos)), split_ends=tuple(split_ends),
        shared=(geo.kv_heads, geo.group, num_queries, sm_scale * LOG2E), out_strides=out_strides,
        lse_strides=lse_strides,
        constexprs={"NUM_STORES": len(stores),
                    "ENCODINGS": tuple(_store_encoding(s, g, q) for s, g in zip(stores, geos)),
                    "HALF": head_dim // 2, "HALF_TILE": half_tile(head_dim), "BLOCK_M": block_m, "BLOCK_N": block_n,
                    "SCORES": scores is not None},
        grid=(batch * geo.kv_heads, m_tiles, total), num_warps=4 if block_m * head_dim <= 64 * 128 else 8,
        total_splits=total,
    ))  # fmt: skip


def _store_pointers(store: KVStore, layout: tuple, score_offset: int) -> StorePointers:
    """This call's StorePointers of a store (0 for the absent scales of a 16-bit field: ints bind fastest)."""
    k_scale, k_zero = (0, 0) if store.k_scale is None else (store.k_scale, store.k_zero)
    v_scale, v_zero = (0, 0) if store.v_scale is None else (store.v_scale, store.v_zero)
    return StorePointers(store.k, store.v, k_scale, k_zero, v_scale, v_zero, store.block_table, *layout, score_offset)


def extend_attention_multi_triton(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: tuple[int, ...] | None = None,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, Q, D) over 1..MAX_STORES stores in one split-K launch (+ one combine launch when there
    are >1 splits) -> out (B, Hq, Q, D) float32 (or `out_dtype`, cast in the kernel), natural-log lse (B, Hq, Q).

    `num_splits` (one count >= 1 per store) overrides the capacity-proportional split counts; `scores` /
    `score_offsets` (Q = 1 only) as in decode_attention_multi (the logits are stored from the tiles the kernel
    already holds: no second pass over the keys). Row bounds are trusted (the twin checks them). The launch plan is
    cached per stores (launch_plans.py): repeated calls over the same store tensors skip the store checks."""
    require_triton()
    check_extend_query(q)
    if has_rotations(stores):  # q rotated per group of stores, outputs rotated back, groups merged (rotation.py)
        return attend_rotated(extend_attention_multi_triton, q, tuple(stores), sm_scale, out_dtype, scores,
                              score_offsets)  # fmt: skip
    if scores is not None and q.shape[2] != 1:
        raise ValueError(f"scores are written for decode (one query per row) only; got {q.shape[2]} queries")
    batch, q_heads, num_queries, head_dim = q.shape
    out = torch.empty(batch, q_heads, num_queries, head_dim, dtype=out_dtype or torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, num_queries, dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # nothing to attend: check the arguments, launch nothing
        check_stores(q, stores)
        check_score_args(q, stores, scores, score_offsets)
        return out, lse
    splits = None if num_splits is None else tuple(num_splits)
    key = plan_key(q, stores, (out_dtype, scores is None, splits, sm_scale))
    plan = find_plan(key, stores)
    if plan is None:
        plan = _new_plan(key, q, stores, sm_scale, num_splits, scores, score_offsets)
    else:
        for i, store in enumerate(stores):
            check_bounds(store, batch, q.device, f"store {i}")
    check_score_args(q, stores, scores, score_offsets)
    total = plan.total_splits
    if total == 1:  # one store, one split: the program writes the final result itself
        part_out, part_lse = out, lse
    else:
        part_out = torch.empty(batch, q_heads, num_queries, total, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, q_heads, num_queries, total, dtype=torch.float32, device=q.device)
    if scores is None:
        io = OutputPointers(q, part_out, part_lse, q.stride(), plan.out_strides, plan.lse_strides, 0, (0, 0))
        score_offsets = (0,) * len(stores)
    else:  # the logit buffer grows with every decode step (so do its strides), its offsets move
        io = OutputPointers(q, part_out, part_lse, q.stride(), plan.out_strides, plan.lse_strides, scores,
                            (scores.stride(0), scores.stride(1)))  # fmt: skip
    pointers, bounds = [], []
    for store, layout, offset, split_end in zip(stores, plan.layouts, score_offsets, plan.split_ends):
        pointers.append(_store_pointers(store, layout, offset))
        bounds += (store.kv_start, store.kv_end, split_end)
    bounds += (0,) * (len(BOUND_ARGS) - len(bounds))  # slots past NUM_STORES: never read
    _multi_split_attention_kernel[plan.grid](io, tuple(pointers), *plan.shared, *bounds, **plan.constexprs,
                                             num_warps=plan.num_warps, num_stages=2)  # fmt: skip
    if total > 1:
        combine_splits(part_out, part_lse, out, lse)
    return out, lse


def decode_attention_multi_triton(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
    num_splits: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding over 1..MAX_STORES stores (extend_attention_multi_triton with one query per row): q (B, Hq, D)
    -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq) float32."""
    check_decode_query(q)
    out, lse = extend_attention_multi_triton(q[:, :, None], stores, sm_scale, out_dtype, num_splits=num_splits,
                                             scores=scores, score_offsets=score_offsets)  # fmt: skip
    return out[:, :, 0], lse[:, :, 0]
