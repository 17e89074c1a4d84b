"""Attention over several stores at once: one split-K launch and one combine launch for all of them.

A quantized layer keeps its tokens in up to three stores (fp16 sinks, the quantized middle, the fp16 window), plus a
shared prefix read in place; a prefill chunk also attends to itself, passed as one more (16-bit, causal) store.
Attending each store separately costs two launches per store and a merge per extra store; here the split axis of
ONE grid is partitioned among the stores (each gets its own number of splits, about proportional to its capacity
and at least one), every program picks its store's pointers and encoding from its split index, and writes its partial (out, lse) into one shared set of partial buffers that the existing combine
kernel merges exactly (log-sum-exp) - across splits and stores alike.

A store is the argument tuple of the one-store kernels:
    (k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, k_bits, v_bits, k_group, v_group)
except that kv_start / kv_end may also be Python ints (the same bound for every row: no tensor to build per step),
and starts are clamped into [0, kv_end] (a caller may pass `layer_start - offset` unclamped). Rows whose span in a
store is empty get nothing from it (partial lse -inf).
"""
from __future__ import annotations

import math

import torch

from kvpress.kernels.decode import (
    LOG2E,
    _MAX_SPLITS,
    _check_decode_query,
    combine_splits,
    _target_programs,
    attend_split,
    check_triton_head_dim,
    dot_operand_type,
    store_attention_reference,
)
from kvpress.kernels.factored import dequant_mode, factored_fields
from kvpress.kernels.launch_plans import LaunchPlan, check_bounds, find_plan, plan_key, remember_plan
from kvpress.kernels.scores import raw_scores_reference
from kvpress.kernels.store_access import check_store_args, store_addressing
from kvpress.kernels.triton_compat import cdiv, next_power_of_2, require_triton, tl, triton

MAX_STORES = 5  # sinks, quantized middle, window, shared prefix (+ the new chunk itself when extending)
StoreArgs = tuple  # (k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, bits x2, groups x2)


def check_multi_args(q: torch.Tensor, stores: tuple[StoreArgs, ...], causal=None) -> list:
    """Check q (B, Hq, D) (decode) or (B, Hq, Q, D), 1..MAX_STORES store tuples and the optional per-store causal
    flags; return each store's StoreGeometry."""
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be shaped (B, Hq, D) (decode) or (B, Hq, Q, D); got {tuple(q.shape)}")
    if not 1 <= len(stores) <= MAX_STORES:
        raise ValueError(f"multi-store attention takes 1 to {MAX_STORES} stores; got {len(stores)}")
    if causal is not None and (len(causal) != len(stores) or not all(isinstance(c, bool) for c in causal)):
        raise ValueError(f"causal needs one bool per store ({len(stores)}); got {causal}")
    geos = []
    q4 = q if q.dim() == 4 else q.unsqueeze(2)
    for i, store in enumerate(stores):
        if len(store) != 13:
            raise ValueError(
                f"store {i} must be (k, v, k_scale, k_zero, v_scale, v_zero, block_table, kv_start, kv_end, "
                f"k_bits, v_bits, k_group, v_group); got {len(store)} items"
            )
        geos.append(check_store_args(q4, *store[:9], *store[9:], int_bounds=True))
    return geos


def check_score_args(
    q: torch.Tensor, stores: tuple[StoreArgs, ...], scores: torch.Tensor | None, score_offsets
) -> None:
    """The optional logits output: float32 (B, Hq, L) with unit stride over L, and one int offset >= 0 per store
    (store token t lands at column offset + t; columns no row attends are left untouched)."""
    if scores is None:
        if score_offsets is not None:
            raise ValueError("score_offsets given without a scores tensor to write")
        return
    if scores.dtype != torch.float32 or scores.dim() != 3 or tuple(scores.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(
            f"scores must be float32 shaped (B, Hq, L) with (B, Hq) = {tuple(q.shape[:2])}; "
            f"got {scores.dtype} {tuple(scores.shape)}"
        )
    if scores.shape[2] > 1 and scores.stride(2) != 1:
        raise ValueError("scores must have unit stride along its last (token) dimension")
    if score_offsets is None or len(score_offsets) != len(stores) or any(
        not isinstance(o, int) or o < 0 for o in score_offsets
    ):
        raise ValueError(f"score_offsets needs one int >= 0 per store ({len(stores)}); got {score_offsets}")


# ----------------------------------------------------------------------------------------------------------
# torch twin
# ----------------------------------------------------------------------------------------------------------


def row_bounds(
    kv_start: torch.Tensor | int, kv_end: torch.Tensor | int, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32 tensors of the multi-store bounds: ints broadcast to every row, starts clamped into [0, end]."""
    end = kv_end if isinstance(kv_end, torch.Tensor) else torch.full((batch,), kv_end, device=device)
    start = kv_start if isinstance(kv_start, torch.Tensor) else torch.full((batch,), kv_start, device=device)
    end = end.to(torch.int32)
    return torch.minimum(start.to(torch.int32).clamp(min=0), end), end


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


def store_attention_multi_reference(
    q: torch.Tensor,
    stores: tuple[StoreArgs, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    causal: tuple[bool, ...] | None = None,
    num_splits: tuple[int, ...] | None = None,
    dequant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin: q (B, Hq, Q, D) over 1..MAX_STORES stores, the one-store twin per store merged exactly ->
    out (B, Hq, Q, D) float32 (or `out_dtype`), natural-log lse (B, Hq, Q) float32. `causal[s]`: query i sees
    only tokens j <= i of store s (a prefill chunk stored as tokens 0..Q-1). `num_splits` and `dequant` only tune
    the Triton kernel."""
    check_multi_args(q, stores, causal)
    if q.dim() != 4:
        raise ValueError(f"q must be shaped (B, Hq, Q, D); got {tuple(q.shape)} (decode: decode_attention_multi)")
    outs, lses = [], []
    for i, (k, v, ks, kz, vs, vz, table, start, end, k_bits, v_bits, k_group, v_group) in enumerate(stores):
        start, end = row_bounds(start, end, q.shape[0], q.device)
        out, lse = store_attention_reference(
            q, k, v, ks, kz, vs, vz, table, start, end, sm_scale, k_bits, v_bits, k_group, v_group,
            causal=bool(causal and causal[i]),
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else merge_partials(torch.stack(outs), torch.stack(lses))
    return (out if out_dtype is None else out.to(out_dtype)), lse


def decode_attention_multi_reference(
    q: torch.Tensor,
    stores: tuple[StoreArgs, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: tuple[int, ...] | None = None,
    dequant: str | None = None,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of decode: q (B, Hq, D) -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq).

    With `scores` (float32 (B, Hq, L)), also writes each attended token's logit in the log2 domain,
    q.k * sm_scale * log2(e), at column score_offsets[store] + token (the pass H2O's mass needs, fused)."""
    _check_decode_query(q)
    check_score_args(q, stores, scores, score_offsets)
    out, lse = store_attention_multi_reference(q[:, :, None], stores, sm_scale, out_dtype)
    if scores is not None:
        for store, offset in zip(stores, score_offsets):
            k, _, ks, kz, _, _, table, start, end, k_bits, _, k_group, _ = store
            start, end = row_bounds(start, end, q.shape[0], q.device)
            t_begin, logits, valid = raw_scores_reference(q, k, ks, kz, table, start, end, sm_scale, k_bits, k_group)
            columns = scores[:, :, offset + t_begin : offset + t_begin + logits.shape[2]]
            columns.copy_(torch.where(valid[:, None, :], logits, columns))
    return out[:, :, 0], lse[:, :, 0]


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _row_bound(bound, b, PER_ROW: tl.constexpr):
    """Row b's bound: loaded from a (B,) tensor when PER_ROW, else the scalar `bound` itself (as int32)."""
    if PER_ROW:
        value = tl.load(bound + b).to(tl.int32)
    else:
        value = (b * 0 + bound).to(tl.int32)
    return value


@triton.jit
def _attend_store(
    q_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
    stride_lb, stride_lh, stride_lq, stride_lsplit,
    b, kv_head, pid_m, split, first_split, split_end, group, num_queries, qk_scale,
    score_ptr, stride_sb, stride_sh, soff,
    k, v, ks, kz, vs, vz, table, start, end,
    skp, skh, sks, skx, sksp, sksh, skss, sksg,
    svp, svh, svs, svx, svsp, svsh, svss, svsg, stb, page,
    KB: tl.constexpr, VB: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr, DT: tl.constexpr,
    PR: tl.constexpr, F16: tl.constexpr, FK: tl.constexpr, FV: tl.constexpr, SR: tl.constexpr, ER: tl.constexpr,
    CT: tl.constexpr, PS: tl.constexpr, CS: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SCORES: tl.constexpr,
):  # fmt: skip
    """Split `split` of the grid, which is local split `split - first_split` of this store's `split_end -
    first_split`: the row's bounds (start clamped into [0, end]), then the shared split-K body."""
    hi = tl.maximum(_row_bound(end, b, ER), 0)
    lo = tl.minimum(tl.maximum(_row_bound(start, b, SR), 0), hi)
    attend_split(
        q_ptr, k, v, ks, kz, vs, vz, table, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qq, stride_qd,
        skp, skh, sks, skx, sksp, sksh, skss, sksg,
        svp, svh, svs, svx, svsp, svsh, svss, svsg,
        stb,
        stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
        stride_lb, stride_lh, stride_lq, stride_lsplit,
        b, kv_head, pid_m, lo, hi, split - first_split, split_end - first_split, split,
        group, num_queries, page, qk_scale, score_ptr, stride_sb, stride_sh, soff,
        HALF, BLOCK_M, BLOCK_N, KB, VB, KG, VG, DT, PR, F16, FK, FV, CT, PS, SCORES, CS,
    )  # fmt: skip


_BOUND_ARGS = [f"{name}{i}" for i in range(MAX_STORES) for name in ("start", "end", "split_end")]


@triton.jit(do_not_specialize=_BOUND_ARGS)
def _multi_split_attention_kernel(
    q_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
    stride_lb, stride_lh, stride_lq, stride_lsplit,
    kv_heads, group, num_queries, qk_scale, score_ptr, stride_sb, stride_sh,
    k0, v0, ks0, kz0, vs0, vz0, table0, start0, end0,
    skp0, skh0, sks0, skx0, sksp0, sksh0, skss0, sksg0,
    svp0, svh0, svs0, svx0, svsp0, svsh0, svss0, svsg0, stb0, page0, split_end0, soff0,
    k1, v1, ks1, kz1, vs1, vz1, table1, start1, end1,
    skp1, skh1, sks1, skx1, sksp1, sksh1, skss1, sksg1,
    svp1, svh1, svs1, svx1, svsp1, svsh1, svss1, svsg1, stb1, page1, split_end1, soff1,
    k2, v2, ks2, kz2, vs2, vz2, table2, start2, end2,
    skp2, skh2, sks2, skx2, sksp2, sksh2, skss2, sksg2,
    svp2, svh2, svs2, svx2, svsp2, svsh2, svss2, svsg2, stb2, page2, split_end2, soff2,
    k3, v3, ks3, kz3, vs3, vz3, table3, start3, end3,
    skp3, skh3, sks3, skx3, sksp3, sksh3, skss3, sksg3,
    svp3, svh3, svs3, svx3, svsp3, svsh3, svss3, svsg3, stb3, page3, split_end3, soff3,
    k4, v4, ks4, kz4, vs4, vz4, table4, start4, end4,
    skp4, skh4, sks4, skx4, sksp4, sksh4, skss4, sksg4,
    svp4, svh4, svs4, svx4, svsp4, svsh4, svss4, svsg4, stb4, page4, split_end4, soff4,
    NUM_STORES: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORES: tl.constexpr,
    KB0: tl.constexpr, VB0: tl.constexpr, KG0: tl.constexpr, VG0: tl.constexpr, DT0: tl.constexpr,
    PR0: tl.constexpr, F160: tl.constexpr, FK0: tl.constexpr, FV0: tl.constexpr, SR0: tl.constexpr,
    ER0: tl.constexpr, CT0: tl.constexpr, PS0: tl.constexpr, CS0: tl.constexpr,
    KB1: tl.constexpr, VB1: tl.constexpr, KG1: tl.constexpr, VG1: tl.constexpr, DT1: tl.constexpr,
    PR1: tl.constexpr, F161: tl.constexpr, FK1: tl.constexpr, FV1: tl.constexpr, SR1: tl.constexpr,
    ER1: tl.constexpr, CT1: tl.constexpr, PS1: tl.constexpr, CS1: tl.constexpr,
    KB2: tl.constexpr, VB2: tl.constexpr, KG2: tl.constexpr, VG2: tl.constexpr, DT2: tl.constexpr,
    PR2: tl.constexpr, F162: tl.constexpr, FK2: tl.constexpr, FV2: tl.constexpr, SR2: tl.constexpr,
    ER2: tl.constexpr, CT2: tl.constexpr, PS2: tl.constexpr, CS2: tl.constexpr,
    KB3: tl.constexpr, VB3: tl.constexpr, KG3: tl.constexpr, VG3: tl.constexpr, DT3: tl.constexpr,
    PR3: tl.constexpr, F163: tl.constexpr, FK3: tl.constexpr, FV3: tl.constexpr, SR3: tl.constexpr,
    ER3: tl.constexpr, CT3: tl.constexpr, PS3: tl.constexpr, CS3: tl.constexpr,
    KB4: tl.constexpr, VB4: tl.constexpr, KG4: tl.constexpr, VG4: tl.constexpr, DT4: tl.constexpr,
    PR4: tl.constexpr, F164: tl.constexpr, FK4: tl.constexpr, FV4: tl.constexpr, SR4: tl.constexpr,
    ER4: tl.constexpr, CT4: tl.constexpr, PS4: tl.constexpr, CS4: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one kv head over one split of one store. Store s owns grid splits
    [split_end{s-1}, split_end{s}) (split_end{-1} = 0); slots >= NUM_STORES are never compiled. Each slot has its
    own pointers, strides, page size and encoding constexprs (bits, groups, dot dtype, factored fields, whether
    its start / end bounds are (B,) tensors (SR / ER) or scalars, its addressing: CONTIGUOUS (CT) and
    PAGE_SHIFT (PS), see store_access.store_addressing, and whether it is attended causally (CS)). SCORES: decode
    programs also store their logits (see attend_split)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    if split < split_end0:
        _attend_store(
            q_ptr, out_ptr, lse_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
            stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
            stride_lb, stride_lh, stride_lq, stride_lsplit,
            b, kv_head, pid_m, split, 0, split_end0, group, num_queries, qk_scale,
            score_ptr, stride_sb, stride_sh, soff0,
            k0, v0, ks0, kz0, vs0, vz0, table0, start0, end0,
            skp0, skh0, sks0, skx0, sksp0, sksh0, skss0, sksg0,
            svp0, svh0, svs0, svx0, svsp0, svsh0, svss0, svsg0, stb0, page0,
            KB0, VB0, KG0, VG0, DT0, PR0, F160, FK0, FV0, SR0, ER0, CT0, PS0, CS0,
            HALF, BLOCK_M, BLOCK_N, SCORES,
        )  # fmt: skip
    if NUM_STORES > 1:
        if (split >= split_end0) & (split < split_end1):
            _attend_store(
                q_ptr, out_ptr, lse_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
                stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
                stride_lb, stride_lh, stride_lq, stride_lsplit,
                b, kv_head, pid_m, split, split_end0, split_end1, group, num_queries, qk_scale,
                score_ptr, stride_sb, stride_sh, soff1,
                k1, v1, ks1, kz1, vs1, vz1, table1, start1, end1,
                skp1, skh1, sks1, skx1, sksp1, sksh1, skss1, sksg1,
                svp1, svh1, svs1, svx1, svsp1, svsh1, svss1, svsg1, stb1, page1,
                KB1, VB1, KG1, VG1, DT1, PR1, F161, FK1, FV1, SR1, ER1, CT1, PS1, CS1,
                HALF, BLOCK_M, BLOCK_N, SCORES,
            )  # fmt: skip
    if NUM_STORES > 2:
        if (split >= split_end1) & (split < split_end2):
            _attend_store(
                q_ptr, out_ptr, lse_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
                stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
                stride_lb, stride_lh, stride_lq, stride_lsplit,
                b, kv_head, pid_m, split, split_end1, split_end2, group, num_queries, qk_scale,
                score_ptr, stride_sb, stride_sh, soff2,
                k2, v2, ks2, kz2, vs2, vz2, table2, start2, end2,
                skp2, skh2, sks2, skx2, sksp2, sksh2, skss2, sksg2,
                svp2, svh2, svs2, svx2, svsp2, svsh2, svss2, svsg2, stb2, page2,
                KB2, VB2, KG2, VG2, DT2, PR2, F162, FK2, FV2, SR2, ER2, CT2, PS2, CS2,
                HALF, BLOCK_M, BLOCK_N, SCORES,
            )  # fmt: skip
    if NUM_STORES > 3:
        if (split >= split_end2) & (split < split_end3):
            _attend_store(
                q_ptr, out_ptr, lse_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
                stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
                stride_lb, stride_lh, stride_lq, stride_lsplit,
                b, kv_head, pid_m, split, split_end2, split_end3, group, num_queries, qk_scale,
                score_ptr, stride_sb, stride_sh, soff3,
                k3, v3, ks3, kz3, vs3, vz3, table3, start3, end3,
                skp3, skh3, sks3, skx3, sksp3, sksh3, skss3, sksg3,
                svp3, svh3, svs3, svx3, svsp3, svsh3, svss3, svsg3, stb3, page3,
                KB3, VB3, KG3, VG3, DT3, PR3, F163, FK3, FV3, SR3, ER3, CT3, PS3, CS3,
                HALF, BLOCK_M, BLOCK_N, SCORES,
            )  # fmt: skip
    if NUM_STORES > 4:
        if (split >= split_end3) & (split < split_end4):
            _attend_store(
                q_ptr, out_ptr, lse_ptr, stride_qb, stride_qh, stride_qq, stride_qd,
                stride_ob, stride_oh, stride_oq, stride_osplit, stride_od,
                stride_lb, stride_lh, stride_lq, stride_lsplit,
                b, kv_head, pid_m, split, split_end3, split_end4, group, num_queries, qk_scale,
                score_ptr, stride_sb, stride_sh, soff4,
                k4, v4, ks4, kz4, vs4, vz4, table4, start4, end4,
                skp4, skh4, sks4, skx4, sksp4, sksh4, skss4, sksg4,
                svp4, svh4, svs4, svx4, svsp4, svsh4, svss4, svsg4, stb4, page4,
                KB4, VB4, KG4, VG4, DT4, PR4, F164, FK4, FV4, SR4, ER4, CT4, PS4, CS4,
                HALF, BLOCK_M, BLOCK_N, SCORES,
            )  # fmt: skip


def multi_split_counts(
    capacities: list[int], programs_per_split: int, block_n: int, target_programs: int
) -> list[int]:
    """Splits per store: the one-store rule's total (enough programs to fill the device, at most one split per
    4 * block_n tokens of capacity) shared out in proportion to capacity, at least 1 each, at most _MAX_SPLITS."""
    wanted = cdiv(target_programs, programs_per_split)
    total = max(1, sum(capacities))
    counts = [
        max(1, min(cdiv(cap, 4 * block_n), round(wanted * cap / total), _MAX_SPLITS)) for cap in capacities
    ]
    while sum(counts) > _MAX_SPLITS:  # trim the largest share (every store keeps one split)
        counts[counts.index(max(counts))] -= 1
    return counts


def multi_tiles(rows: int, head_dim: int) -> tuple[int, int, int]:
    """(block_m, block_n, m_tiles) for `rows` query rows per kv head (GQA group x queries), as the one-store kernel
    picks them."""
    block_m = max(16, min(64, next_power_of_2(rows)))
    block_n = 64 if block_m > 16 and head_dim <= 128 else 32
    return block_m, block_n, cdiv(rows, block_m)


_SHARED_RUNTIME = ("q_ptr", "out_ptr", "lse_ptr", "stride_qb", "stride_qh", "stride_qq", "stride_qd", "stride_ob",
                   "stride_oh", "stride_oq", "stride_osplit", "stride_od", "stride_lb", "stride_lh", "stride_lq",
                   "stride_lsplit", "kv_heads", "group", "num_queries", "qk_scale", "score_ptr", "stride_sb",
                   "stride_sh")  # fmt: skip
_SLOT_RUNTIME = ("k", "v", "ks", "kz", "vs", "vz", "table", "start", "end", "skp", "skh", "sks", "skx", "sksp", "sksh",
                 "skss", "sksg", "svp", "svh", "svs", "svx", "svsp", "svsh", "svss", "svsg", "stb", "page", "split_end",
                 "soff")
_SHARED_CONSTEXPRS = ("NUM_STORES", "HALF", "BLOCK_M", "BLOCK_N", "SCORES")
_SLOT_CONSTEXPRS = ("KB", "VB", "KG", "VG", "DT", "PR", "F16", "FK", "FV", "SR", "ER", "CT", "PS", "CS")


def launch_arg_names() -> list[str]:
    """The kernel's parameters in the order decode_attention_multi_triton passes them (pinned by a test)."""
    slots = lambda names: [f"{name}{i}" for i in range(MAX_STORES) for name in names]  # noqa: E731
    return [*_SHARED_RUNTIME, *slots(_SLOT_RUNTIME), *_SHARED_CONSTEXPRS, *slots(_SLOT_CONSTEXPRS)]


def _scale_args(scale: torch.Tensor | None, zero: torch.Tensor | None) -> tuple:
    """(scale, zero, *4 strides) of a field; 0s for a 16-bit field, whose scale pointers are never read (an int
    binds in a fraction of a tensor's launch cost)."""
    if scale is None:
        return 0, 0, 0, 0, 0, 0
    return scale, zero, *scale.stride()


def _slot_args(
    store: StoreArgs, geo, q: torch.Tensor, dequant: str, split_end: int, score_offset: int, causal: bool
) -> tuple[list, list]:
    """Runtime arguments (_SLOT_RUNTIME) and constexprs (_SLOT_CONSTEXPRS) of one store slot of the kernel."""
    k, v, k_scale, k_zero, v_scale, v_zero, table, start, end, k_bits, v_bits, _, _ = store
    ks, kz, *ks_strides = _scale_args(k_scale, k_zero)
    vs, vz, *vs_strides = _scale_args(v_scale, v_zero)
    dot_dtype, precision, fp16_codes = dot_operand_type(q, [(k, k_bits), (v, v_bits)])
    factor_k, factor_v = factored_fields(dequant, geo.head_dim, k_bits, v_bits, geo.k_group, geo.v_group)
    contiguous, page_shift = store_addressing(table, geo.page_size)
    runtime = [k, v, ks, kz, vs, vz, table, start, end, *k.stride(), *ks_strides, *v.stride(), *vs_strides,
               table.stride(0), geo.page_size, split_end, score_offset]  # fmt: skip
    constexprs = [k_bits, v_bits, geo.k_group, geo.v_group, dot_dtype, precision, fp16_codes, factor_k, factor_v,
                  isinstance(start, torch.Tensor), isinstance(end, torch.Tensor), contiguous, page_shift,
                  causal]  # fmt: skip
    return runtime, constexprs


def store_attention_multi_triton(
    q: torch.Tensor,
    stores: tuple[StoreArgs, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    causal: tuple[bool, ...] | None = None,
    num_splits: tuple[int, ...] | None = None,
    dequant: str | None = None,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, Q, D) over 1..MAX_STORES stores in one split-K launch (+ one combine launch when there
    are >1 splits) -> out (B, Hq, Q, D) float32 (or `out_dtype`, cast in the kernel), natural-log lse (B, Hq, Q).

    `causal` as in the twin; `num_splits` (one count >= 1 per store) overrides the capacity-proportional split
    counts; `dequant` as in store_attention_triton; `scores` / `score_offsets` (Q = 1 only) as in
    decode_attention_multi_reference (the logits are stored from the tiles the kernel already holds: no second
    pass over the keys). Row bounds are trusted (the twin checks them). The launch plan is cached per stores
    (launch_plans.py): repeated calls over the same store tensors skip the store checks and argument building."""
    require_triton()
    if q.dim() != 4:
        raise ValueError(f"q must be shaped (B, Hq, Q, D); got {tuple(q.shape)} (decode: decode_attention_multi)")
    if scores is not None and q.shape[2] != 1:
        raise ValueError(f"scores are written for decode (one query per row) only; got {q.shape[2]} queries")
    batch, q_heads, num_queries, head_dim = q.shape
    out = torch.empty(batch, q_heads, num_queries, head_dim, dtype=out_dtype or torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, num_queries, dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # nothing to attend: check the arguments, launch nothing
        check_multi_args(q, stores, causal)
        check_score_args(q, stores, scores, score_offsets)
        return out, lse
    splits = None if num_splits is None else tuple(num_splits)
    key = plan_key(q, stores, (out_dtype, causal, scores is None, splits, dequant_mode(dequant), sm_scale))
    plan = find_plan(key, stores)
    if plan is None:
        plan = _new_plan(key, q, stores, sm_scale, out_dtype, causal, num_splits, dequant, scores, score_offsets)
    else:
        check_bounds(stores, batch, q.device)
    check_score_args(q, stores, scores, score_offsets)
    total = plan.total_splits
    if total == 1:  # one store, one split: the program writes the final result itself
        part_out, part_lse = out, lse
    else:
        part_out = torch.empty(batch, q_heads, num_queries, total, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, q_heads, num_queries, total, dtype=torch.float32, device=q.device)
    args = list(plan.args)
    args[0], args[1], args[2] = q, part_out, part_lse
    if scores is not None:  # its length (and so its strides) grows with every decode step, its offsets move
        args[_SCORE_ARG : _SCORE_ARG + 3] = scores, scores.stride(0), scores.stride(1)
        for at, offset in zip(plan.store_slots, score_offsets):
            args[at + _SOFF] = offset
    for at, store in zip(plan.store_slots, stores):  # the store's tensors (0: no scale) and this call's bounds
        args[at : at + 9] = [0 if t is None else t for t in store[:9]]
    _multi_split_attention_kernel[plan.grid](*args, num_warps=plan.num_warps, num_stages=2)
    if total > 1:
        combine_splits(part_out, part_lse, out, lse)
    return out, lse


_SCORE_ARG = len(_SHARED_RUNTIME) - 3  # position of score_ptr in the argument list (then stride_sb, stride_sh)
_SOFF = _SLOT_RUNTIME.index("soff")  # position of a store's logit column offset within its slot


def _new_plan(key, q, stores, sm_scale, out_dtype, causal, num_splits, dequant, scores, score_offsets) -> LaunchPlan:
    """Check everything and build the launch plan of a (query shape, stores) combination not seen before."""
    geos = check_multi_args(q, stores, causal)
    check_score_args(q, stores, scores, score_offsets)
    geo = geos[0]
    check_triton_head_dim(geo.head_dim)
    batch, q_heads, num_queries, head_dim = q.shape
    block_m, block_n, m_tiles = multi_tiles(geo.group * num_queries, head_dim)
    if num_splits is None:
        capacities = [store[6].shape[1] * g.page_size for store, g in zip(stores, geos)]
        counts = multi_split_counts(capacities, batch * geo.kv_heads * m_tiles, block_n, _target_programs(q.device))
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
    mode = dequant_mode(dequant)
    # All positional, in the order of launch_arg_names(): binding ~70 constexprs by keyword costs more host time than
    # the rest of the launch.
    score_args = (0, 0, 0) if scores is None else (None, None, None)  # patched per call
    args = [None, None, None, *q.stride(), *out_strides, *lse_strides,
            geo.kv_heads, geo.group, num_queries, sm_scale * LOG2E, *score_args]  # fmt: skip
    slot_constexprs, store_slots = [], []
    split_end = 0
    for i, (store, g, count) in enumerate(zip(stores, geos, counts)):
        split_end += count
        offset = 0 if scores is None else score_offsets[i]
        runtime, constexprs = _slot_args(store, g, q, mode, split_end, offset, bool(causal and causal[i]))
        store_slots.append(len(args))  # k, v, scales, zeros, table, start, end: patched per call
        args += [None] * 9 + runtime[9:]  # the plan keeps no tensor alive
        slot_constexprs += constexprs
    for _ in range(MAX_STORES - len(stores)):  # unused slots are never compiled: ints bind fastest
        args += [0] * len(_SLOT_RUNTIME)
        slot_constexprs += constexprs
    args += [len(stores), head_dim // 2, block_m, block_n, scores is not None, *slot_constexprs]
    return remember_plan(key, stores, {
        "args": args, "store_slots": store_slots, "grid": (batch * geo.kv_heads, m_tiles, total),
        "num_warps": 4 if block_m * head_dim <= 64 * 128 else 8, "total_splits": total,
    })  # fmt: skip


def decode_attention_multi_triton(
    q: torch.Tensor,
    stores: tuple[StoreArgs, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    num_splits: tuple[int, ...] | None = None,
    dequant: str | None = None,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding over 1..MAX_STORES stores (store_attention_multi_triton with one query per row): q (B, Hq, D)
    -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq) float32."""
    _check_decode_query(q)
    out, lse = store_attention_multi_triton(q[:, :, None], stores, sm_scale, out_dtype, num_splits=num_splits,
                                            dequant=dequant, scores=scores, score_offsets=score_offsets)  # fmt: skip
    return out[:, :, 0], lse[:, :, 0]
