"""Quantize-and-store: quantize new K or V tokens and write codes, scales and zeros straight into a store.

Two implementations with one signature: `quantize_store_triton` (fused Triton kernel) and
`quantize_store_reference` (torch twin built on kvpress.kernels.affine.quantize, which defines the expected bytes).
Token n of row b goes to logical index t = dst_start[b] + n: page block_table[b, t // S], slot t % S.
`token_block` G: keys quantized per channel over blocks of G tokens (affine.quantize_channels), a kernel of its own.
"""
from __future__ import annotations

import torch

from kvpress.kernels.affine import FP16_MAX, SCALE_FLOOR, check_token_block, quantize, quantize_channels
from kvpress.kernels.affine_layout import code_width, effective_group_size

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch twin still works without triton
    triton = None
    tl = None


def _check_store_args(
    x: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    zero_out: torch.Tensor,
    block_table: torch.Tensor,
    dst_start: torch.Tensor,
    bits: int,
    group_size: int | None,
    token_block: int | None = None,
) -> int:
    """Validate shapes, dtypes and devices; return the effective group size (per-channel codes: the scale columns
    per token slot are head_dim / token_block, as if groups of token_block elements)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, H, N, D), got {x.dtype} {tuple(x.shape)}")
    batch, heads, n_tokens, head_dim = x.shape
    if token_block is None:
        group = effective_group_size(head_dim, bits, group_size)
    else:
        group = check_token_block(head_dim, token_block)
        if n_tokens % token_block:
            raise ValueError(f"per-channel codes are stored in whole blocks of {token_block} tokens; got {n_tokens}")
    width = code_width(head_dim, bits)
    if q_out.dim() != 4 or q_out.dtype != torch.uint8 or q_out.shape[1] != heads or q_out.shape[3] != width:
        raise ValueError(
            f"q_out must be uint8 (P, {heads}, S, {width}) for {bits}-bit head_dim={head_dim}, "
            f"got {q_out.dtype} {tuple(q_out.shape)}"
        )
    meta_shape = (*q_out.shape[:3], head_dim // group)
    for name, meta in (("scale_out", scale_out), ("zero_out", zero_out)):
        if meta.dtype != torch.float16 or tuple(meta.shape) != meta_shape:
            raise ValueError(f"{name} must be float16 {meta_shape}, got {meta.dtype} {tuple(meta.shape)}")
    if block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 ({batch}, max_pages), got {block_table.dtype} {tuple(block_table.shape)}")
    if tuple(dst_start.shape) != (batch,) or dst_start.dtype != torch.int32:
        raise ValueError(f"dst_start must be int32 ({batch},), got {dst_start.dtype} {tuple(dst_start.shape)}")
    devices = {t.device for t in (x, q_out, scale_out, zero_out, block_table, dst_start)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return group


def _check_store_values(x: torch.Tensor, q_out: torch.Tensor, block_table: torch.Tensor, dst_start: torch.Tensor,
                        token_block: int | None = None) -> None:
    """Check data-dependent preconditions with a single host sync: finite x, in-range targets and pages (and, for
    per-channel codes, targets that start a block)."""
    n_tokens, page_size, n_pages = x.shape[2], q_out.shape[2], q_out.shape[0]
    capacity = block_table.shape[1] * page_size
    columns = torch.arange(block_table.shape[1], device=x.device)
    first_page = (dst_start // page_size).unsqueeze(1)
    last_page = ((dst_start + n_tokens - 1) // page_size).unsqueeze(1)
    used = (columns >= first_page) & (columns <= last_page)
    pages_ok = ((block_table >= 0) & (block_table < n_pages)) | ~used
    flags = torch.stack(
        (
            x.abs().amax() <= FP16_MAX,  # False for NaN as well
            ((dst_start >= 0) & (dst_start + n_tokens <= capacity)).all(),
            pages_ok.all(),
            (dst_start % (token_block or 1) == 0).all(),
        )
    ).tolist()
    if not flags[0]:
        raise ValueError(f"x holds NaN/inf or values beyond the fp16 range (|x| > {FP16_MAX:g}); clean or rescale it")
    if not flags[1]:
        raise ValueError(f"dst_start + {n_tokens} tokens must lie in [0, {capacity}] (max_pages * page size); grow the block table")
    if not flags[2]:
        raise ValueError(f"block_table holds page ids outside [0, {n_pages}) for pages being written")
    if not flags[3]:
        raise ValueError(f"per-channel codes start at a block boundary: dst_start must be a multiple of {token_block}")


def quantize_store_reference(
    x: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    zero_out: torch.Tensor,
    block_table: torch.Tensor,
    dst_start: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    check_values: bool = True,
    token_block: int | None = None,
) -> None:
    """Torch twin: quantize x (B, H, N, D) with affine.quantize and scatter into the paged store in place.
    `token_block` G: per-channel codes instead (affine.quantize_channels: N and dst_start multiples of G, scales in
    slot layout), `group_size` then unused.

    check_values=True validates x (finite, |x| <= 65504) and the target pages at one host sync; pass
    False on hot paths whose inputs are known to be valid (invalid input then writes unspecified bytes).
    """
    _check_store_args(x, q_out, scale_out, zero_out, block_table, dst_start, bits, group_size, token_block)
    batch, heads, n_tokens, _ = x.shape
    if n_tokens == 0 or batch == 0:
        return
    if check_values:
        _check_store_values(x, q_out, block_table, dst_start, token_block)
    if token_block is None:
        codes, scale, zero = quantize(x, bits, group_size, check_finite=False)
    else:
        codes, scale, zero = quantize_channels(x, bits, token_block, check_finite=False)
    page_size = q_out.shape[2]
    logical = dst_start.long().unsqueeze(1) + torch.arange(n_tokens, device=x.device)  # (B, N)
    pages = block_table.long().gather(1, logical // page_size).unsqueeze(1)  # (B, 1, N)
    slots = (logical % page_size).unsqueeze(1)
    head_ids = torch.arange(heads, device=x.device).view(1, heads, 1)
    q_out[pages, head_ids, slots] = codes
    scale_out[pages, head_ids, slots] = scale
    zero_out[pages, head_ids, slots] = zero


if triton is not None:
    _SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)

    @triton.jit
    def _round_up_to_fp16(value):
        # Nearest fp16 >= value; fp16 is sign-magnitude, so one step up is +1 or -1 on the bits.
        nearest = value.to(tl.float16)
        bits = nearest.to(tl.int16, bitcast=True)
        next_up = tl.where(bits >= 0, bits + 1, bits - 1).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.where(nearest.to(tl.float32) < value, next_up, nearest)

    @triton.jit
    def _group_scale_zero(lo, hi, LEVELS: tl.constexpr):
        # fp16 (scale, zero) and their float32 values for group minima / maxima: the same IEEE steps as
        # kvpress.kernels.affine.group_scale_zero (the bytes of both kernels must equal the torch twin's).
        zero = -_round_up_to_fp16(-(lo + (hi - lo) * (0.5 / LEVELS)))
        zero_f = zero.to(tl.float32)
        steps = tl.full(lo.shape, LEVELS - 0.5, tl.float32)
        needed = tl.maximum(tl.math.div_rn(hi - zero_f, steps), (zero_f - lo) * 2.0)
        scale = _round_up_to_fp16(tl.maximum(needed, _SCALE_FLOOR))
        return scale, zero, scale.to(tl.float32), zero_f

    @triton.jit
    def _quantize_store_kernel(
        x_ptr, q_ptr, scale_ptr, zero_ptr, table_ptr, start_ptr,
        n_tokens, n_heads, page_size,
        sx_b, sx_h, sx_n, sx_d,
        sq_p, sq_h, sq_s, sq_x,
        ss_p, ss_h, ss_s, ss_g,
        sz_p, sz_h, sz_s, sz_g,
        st_b, st_p,
        LEVELS: tl.constexpr, PARTS: tl.constexpr, PART_WIDTH: tl.constexpr, PART_PAD: tl.constexpr,
        GROUP: tl.constexpr, GROUPS_PER_PART: tl.constexpr, PAD_GROUPS_PER_PART: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # One program: BLOCK_N tokens of one (row, head). Head_dim is seen as PARTS parts of PART_WIDTH
        # elements (four quarters for 2-bit, two halves for 4-bit, one part for 8-bit), each padded to PART_PAD
        # lanes. A group lies in one part (GROUPS_PER_PART of them, PAD_GROUPS_PER_PART with the padding) or spans
        # whole padded parts (GROUPS_PER_PART = 1 then); padding lanes never count in a group's min / max.
        row_head = tl.program_id(0)
        row = (row_head // n_heads).to(tl.int64)
        head = row_head % n_heads
        tok = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_ok = tok < n_tokens
        logical = tl.load(start_ptr + row) + tok
        page = tl.load(table_ptr + row * st_b + (logical // page_size) * st_p, mask=tok_ok, other=0).to(tl.int64)
        slot = (logical % page_size).to(tl.int64)

        part = tl.arange(0, PARTS)
        lane = tl.arange(0, PART_PAD)
        col = part[:, None] * PART_WIDTH + lane[None, :]  # (PARTS, PART_PAD)
        col_ok = (lane[None, :] < PART_WIDTH) & (part[:, None] >= 0)
        ok = tok_ok[:, None, None] & col_ok[None, :, :]  # (BLOCK_N, PARTS, PART_PAD)
        x_offs = row * sx_b + head * sx_h + tok[:, None, None] * sx_n + col[None, :, :] * sx_d
        x = tl.load(x_ptr + x_offs, mask=ok, other=0.0).to(tl.float32)

        N_GROUPS: tl.constexpr = PARTS * PART_PAD // GROUP
        xg = tl.reshape(x, [BLOCK_N, N_GROUPS, GROUP])
        okg = tl.reshape(ok, [BLOCK_N, N_GROUPS, GROUP])
        lo = tl.min(tl.where(okg, xg, float("inf")), axis=2)
        hi = tl.max(tl.where(okg, xg, float("-inf")), axis=2)
        real = hi >= lo  # padding groups / tokens have no element: give them harmless stats
        lo = tl.where(real, lo, 0.0)
        hi = tl.where(real, hi, 0.0)

        scale, zero, scale_f, zero_f = _group_scale_zero(lo, hi, LEVELS)

        y = tl.math.div_rn(xg - zero_f[:, :, None], scale_f[:, :, None]) + 0.5
        codes = tl.minimum(tl.maximum(tl.floor(y), 0.0), LEVELS - 1.0)
        codes = tl.reshape(codes, [BLOCK_N, PARTS, PART_PAD]).to(tl.int32)

        dst = page * sq_p + head * sq_h + slot * sq_s
        if PARTS == 2:
            low, high = tl.split(tl.permute(codes, (0, 2, 1)))
            packed = (low | (high << 4)).to(tl.uint8)
            tl.store(q_ptr + dst[:, None] + lane[None, :] * sq_x, packed,
                     mask=tok_ok[:, None] & (lane[None, :] < PART_WIDTH))
        elif PARTS == 4:  # split quarters: quarter i in bits 2i, 2i + 1 (disjoint bits, so the sum is an or)
            packed = tl.sum(codes << (part * 2)[None, :, None], axis=1).to(tl.uint8)
            tl.store(q_ptr + dst[:, None] + lane[None, :] * sq_x, packed,
                     mask=tok_ok[:, None] & (lane[None, :] < PART_WIDTH))
        else:
            flat = tl.reshape(codes, [BLOCK_N, PART_PAD]).to(tl.uint8)
            tl.store(q_ptr + dst[:, None] + lane[None, :] * sq_x, flat,
                     mask=tok_ok[:, None] & (lane[None, :] < PART_WIDTH))

        g = tl.arange(0, N_GROUPS)
        within = g % PAD_GROUPS_PER_PART
        g_real = (g // PAD_GROUPS_PER_PART) * GROUPS_PER_PART + within
        g_ok = tok_ok[:, None] & (within < GROUPS_PER_PART)[None, :]
        tl.store(scale_ptr + (page * ss_p + head * ss_h + slot * ss_s)[:, None] + g_real[None, :] * ss_g, scale, mask=g_ok)
        tl.store(zero_ptr + (page * sz_p + head * sz_h + slot * sz_s)[:, None] + g_real[None, :] * sz_g, zero, mask=g_ok)

    @triton.jit
    def _quantize_channels_kernel(
        x_ptr, q_ptr, scale_ptr, zero_ptr, table_ptr, start_ptr,
        n_heads, page_size,
        sx_b, sx_h, sx_n, sx_d,
        sq_p, sq_h, sq_s, sq_x,
        ss_p, ss_h, ss_s, ss_g,
        sz_p, sz_h, sz_s, sz_g,
        st_b, st_p,
        LEVELS: tl.constexpr, PARTS: tl.constexpr, PART_WIDTH: tl.constexpr, LANES: tl.constexpr,
        BLOCK: tl.constexpr, WIDTH: tl.constexpr,
    ):
        # One program: the BLOCK tokens of block program_id(1) of one (row, head), lanes [c * LANES, (c + 1) * LANES)
        # of each of the PARTS parts of head_dim (c = program_id(2); parts as in _quantize_store_kernel), so channel
        # d = part * PART_WIDTH + lane. Each channel is one group over the block's tokens; its scale / zero go to
        # the block's token first + d // WIDTH, column d % WIDTH (slot layout, WIDTH = head_dim / BLOCK).
        row_head = tl.program_id(0)
        row = (row_head // n_heads).to(tl.int64)
        head = row_head % n_heads
        first = tl.program_id(1) * BLOCK
        tok = first + tl.arange(0, BLOCK)
        row_start = tl.load(start_ptr + row)
        logical = row_start + tok
        page = tl.load(table_ptr + row * st_b + (logical // page_size) * st_p).to(tl.int64)
        slot = (logical % page_size).to(tl.int64)

        part = tl.arange(0, PARTS)
        lane = tl.program_id(2) * LANES + tl.arange(0, LANES)
        lane_ok = lane < PART_WIDTH
        chan = part[:, None] * PART_WIDTH + lane[None, :]  # (PARTS, LANES)
        chan_ok = lane_ok[None, :] & (part[:, None] >= 0)
        x_offs = row * sx_b + head * sx_h + tok[:, None, None] * sx_n + chan[None, :, :] * sx_d
        x = tl.load(x_ptr + x_offs, mask=chan_ok[None, :, :], other=0.0).to(tl.float32)  # (BLOCK, PARTS, LANES)
        lo = tl.min(x, axis=0)  # padding lanes read 0 for every token: harmless stats, never stored
        hi = tl.max(x, axis=0)

        scale, zero, scale_f, zero_f = _group_scale_zero(lo, hi, LEVELS)

        y = tl.math.div_rn(x - zero_f[None, :, :], scale_f[None, :, :]) + 0.5
        codes = tl.minimum(tl.maximum(tl.floor(y), 0.0), LEVELS - 1.0).to(tl.int32)

        dst = (page * sq_p + head * sq_h + slot * sq_s)[:, None] + lane[None, :] * sq_x
        if PARTS == 2:
            low, high = tl.split(tl.permute(codes, (0, 2, 1)))
            packed = (low | (high << 4)).to(tl.uint8)
        elif PARTS == 4:  # split quarters: quarter i in bits 2i, 2i + 1 (disjoint bits, so the sum is an or)
            packed = tl.sum(codes << (part * 2)[None, :, None], axis=1).to(tl.uint8)
        else:
            packed = tl.reshape(codes, [BLOCK, LANES]).to(tl.uint8)
        tl.store(q_ptr + dst, packed, mask=lane_ok[None, :])

        meta_logical = row_start + first + chan // WIDTH  # the token slot holding channel chan's pair
        meta_page = tl.load(table_ptr + row * st_b + (meta_logical // page_size) * st_p, mask=chan_ok,
                            other=0).to(tl.int64)
        meta_slot = (meta_logical % page_size).to(tl.int64)
        column = chan % WIDTH
        tl.store(scale_ptr + meta_page * ss_p + head * ss_h + meta_slot * ss_s + column * ss_g, scale, mask=chan_ok)
        tl.store(zero_ptr + meta_page * sz_p + head * sz_h + meta_slot * sz_s + column * sz_g, zero, mask=chan_ok)


CHANNEL_TILE_ELEMENTS = 4096  # elements of x one per-channel program holds (BLOCK x PARTS x LANES)


def _quantize_channels_triton(
    x: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor, zero_out: torch.Tensor, block_table: torch.Tensor,
    dst_start: torch.Tensor, bits: int, token_block: int,
) -> None:
    """Launch the per-channel kernel: one program per (row, head, block of token_block tokens, chunk of lanes)."""
    batch, heads, n_tokens, head_dim = x.shape
    parts = 8 // bits
    if head_dim % parts:
        raise ValueError(f"the Triton kernel packs {bits}-bit codes of head_dim in {parts} parts: head_dim must be a "
                         f"multiple of {parts}; got {head_dim}")
    part_width = head_dim // parts
    lanes = min(triton.next_power_of_2(part_width), max(1, CHANNEL_TILE_ELEMENTS // (token_block * parts)))
    grid = (batch * heads, n_tokens // token_block, triton.cdiv(part_width, lanes))
    _quantize_channels_kernel[grid](
        x, q_out, scale_out, zero_out, block_table, dst_start,
        heads, q_out.shape[2],
        *x.stride(), *q_out.stride(), *scale_out.stride(), *zero_out.stride(), *block_table.stride(),
        LEVELS=2**bits, PARTS=parts, PART_WIDTH=part_width, LANES=lanes, BLOCK=token_block,
        WIDTH=head_dim // token_block,
        enable_fp_fusion=False,  # keep every mul and add separately rounded, like torch
    )


def quantize_store_triton(
    x: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    zero_out: torch.Tensor,
    block_table: torch.Tensor,
    dst_start: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    check_values: bool = True,
    token_block: int | None = None,
) -> None:
    """Fused Triton kernel: same bytes as quantize_store_reference, in one launch. `token_block` G: keys per
    channel over blocks of G tokens (N and dst_start multiples of G), by a kernel of its own.

    check_values=True validates x (finite, |x| <= 65504) and the target pages at one host sync; pass
    False on hot paths whose inputs are known to be valid (invalid input then writes unspecified bytes).
    """
    if triton is None:
        raise ValueError("quantize_store_triton needs the triton package; use quantize_store_reference instead")
    group = _check_store_args(x, q_out, scale_out, zero_out, block_table, dst_start, bits, group_size, token_block)
    batch, heads, n_tokens, head_dim = x.shape
    if n_tokens == 0 or batch == 0:
        return
    if check_values:
        _check_store_values(x, q_out, block_table, dst_start, token_block)
    if token_block is not None:
        _quantize_channels_triton(x, q_out, scale_out, zero_out, block_table, dst_start, bits, token_block)
        return
    parts = 8 // bits
    part_width = head_dim // parts
    part_pad = triton.next_power_of_2(part_width)
    spanning = group % part_width == 0  # whole parts (the whole head; 2-bit: two quarters), each padded
    if not spanning and (part_width % group or group & (group - 1)):
        part = {2: "quarter", 4: "half"}.get(bits, "head")
        raise ValueError(f"the Triton kernel needs a {bits}-bit group that is a power of two dividing the {part} of "
                         f"head_dim={head_dim} ({part_width}) or whole {part}s; got {group} "
                         "(use quantize_store_reference)")
    block_n = min(16, triton.next_power_of_2(n_tokens))
    grid = (batch * heads, triton.cdiv(n_tokens, block_n))
    _quantize_store_kernel[grid](
        x, q_out, scale_out, zero_out, block_table, dst_start,
        n_tokens, heads, q_out.shape[2],
        *x.stride(), *q_out.stride(), *scale_out.stride(), *zero_out.stride(), *block_table.stride(),
        LEVELS=2**bits, PARTS=parts, PART_WIDTH=part_width, PART_PAD=part_pad,
        GROUP=group // part_width * part_pad if spanning else group,
        GROUPS_PER_PART=1 if spanning else part_width // group,
        PAD_GROUPS_PER_PART=1 if spanning else part_pad // group,
        BLOCK_N=block_n,
        enable_fp_fusion=False,  # keep every mul and add separately rounded, like torch
    )
