"""Triton helpers that load stored tokens (contiguous or paged, 16-bit or quantized) into register tiles: page
lookup, code unpacking (split-halves int4, split-quarters int2), the fp16 bit trick, and the affine
x = code * scale + zero per group of a token (load_token_halves) or per channel of a block of tokens
(load_channel_halves: keys of KVStore.k_block)."""
from kvpress.kernels.triton_compat import tl, triton


@triton.jit
def _apply_group_affine(
    codes, scale_ptr, zero_ptr, scale_row_offsets, half_index, stride_g, token_mask,
    HALF: tl.constexpr, HALF_TILE: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """x = code * scale + zero, in the codes' dtype, for one (BLOCK_N, HALF_TILE) half: loads each token's few group
    scales once and broadcasts them over their group (a group spans one half, or the whole head). Groups within a
    half tile the padded half (HALF_TILE) too: the padding groups' scales read 0."""
    if GROUP >= 2 * HALF:  # one group per token
        scale = tl.load(scale_ptr + scale_row_offsets, mask=token_mask, other=0).to(codes.dtype)
        zero = tl.load(zero_ptr + scale_row_offsets, mask=token_mask, other=0).to(codes.dtype)
        result = codes * scale[:, None] + zero[:, None]
    elif GROUP == HALF:  # one group per half
        offsets = scale_row_offsets + half_index * stride_g
        scale = tl.load(scale_ptr + offsets, mask=token_mask, other=0).to(codes.dtype)
        zero = tl.load(zero_ptr + offsets, mask=token_mask, other=0).to(codes.dtype)
        result = codes * scale[:, None] + zero[:, None]
    else:
        GROUPS: tl.constexpr = HALF_TILE // GROUP  # groups of the tile
        REAL_GROUPS: tl.constexpr = HALF // GROUP  # groups of the half (fewer when the half is padded)
        group_ids = tl.arange(0, GROUPS)
        offsets = scale_row_offsets[:, None] + (half_index * REAL_GROUPS + group_ids)[None, :] * stride_g
        scale_mask = token_mask[:, None]
        if GROUPS != REAL_GROUPS:
            scale_mask = scale_mask & (group_ids < REAL_GROUPS)[None, :]
        scale = tl.load(scale_ptr + offsets, mask=scale_mask, other=0).to(codes.dtype)
        zero = tl.load(zero_ptr + offsets, mask=scale_mask, other=0).to(codes.dtype)
        grouped = tl.reshape(codes, (codes.shape[0], GROUPS, GROUP))
        result = tl.reshape(grouped * scale[:, :, None] + zero[:, :, None], (codes.shape[0], HALF_TILE))
    return result


@triton.jit
def _fp16_from_codes(codes):
    """Exact uint code (< 1024) -> fp16 without a conversion instruction: the bits 0x6400 | c read as fp16 are
    1024 + c, and subtracting 1024 is exact (conversions are the slow path of dequantization on GPUs)."""
    biased = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return biased - tl.full(biased.shape, 1024.0, tl.float16)


@triton.jit
def _load_code_halves(
    base_ptr, row_offsets, stride_x, token_mask, HALF: tl.constexpr, HALF_TILE: tl.constexpr, BITS: tl.constexpr
):  # fmt: skip
    """Load BLOCK_N stored tokens' codes (or 16-bit values) as two (BLOCK_N, HALF_TILE) halves, unpacked (split
    halves / split quarters) but not converted; padding columns (HALF_TILE > HALF) read 0."""
    cols = tl.arange(0, HALF_TILE)
    mask = token_mask[:, None]
    if HALF_TILE != HALF:  # padded head dim: no load past a half's HALF columns
        mask = mask & (cols < HALF)[None, :]
    if BITS == 4:
        packed = tl.load(base_ptr + row_offsets[:, None] + cols[None, :] * stride_x, mask=mask, other=0)
        low = packed & 15
        high = packed >> 4
    elif BITS == 2:  # split quarters: column c of a half is byte c % QUARTER, bits 2 * (c // QUARTER) (+ 4: high)
        QUARTER: tl.constexpr = HALF // 2
        packed = tl.load(base_ptr + row_offsets[:, None] + (cols[None, :] % QUARTER) * stride_x, mask=mask, other=0)
        quarter = cols // QUARTER
        if HALF_TILE != HALF:  # padding columns: keep the shifts below 8 (their bytes read 0)
            quarter = tl.minimum(quarter, 1)
        shift = (quarter * 2).to(tl.uint8)[None, :]
        low = (packed >> shift) & 3
        high = (packed >> (shift + 4)) & 3
    else:
        low = tl.load(base_ptr + row_offsets[:, None] + cols[None, :] * stride_x, mask=mask, other=0)
        high = tl.load(base_ptr + row_offsets[:, None] + (cols[None, :] + HALF) * stride_x, mask=mask, other=0)
    return low, high


@triton.jit
def _codes_to_float(codes, FP16_CODES: tl.constexpr):
    """Codes as fp16 by the bit trick when FP16_CODES, else as float32: the dtype the affine runs in."""
    if FP16_CODES:
        values = _fp16_from_codes(codes)
    else:
        values = codes.to(tl.float32)
    return values


@triton.jit
def load_token_halves(
    base_ptr, scale_ptr, zero_ptr, row_offsets, scale_row_offsets, stride_x, stride_g, token_mask,
    HALF: tl.constexpr, HALF_TILE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, COMPUTE: tl.constexpr,
    FP16_CODES: tl.constexpr,
):  # fmt: skip
    """Load BLOCK_N stored tokens and dequantize them into two (BLOCK_N, HALF_TILE) half-vectors of dtype COMPUTE
    (HALF real columns each; padding columns, when HALF_TILE > HALF, are masked: finite values, never used).

    FP16_CODES (COMPUTE is fp16): codes become fp16 by bit tricks and the affine runs in fp16, so the hot
    loop has no int->float or float->half conversions; otherwise it runs in fp32 and is cast at the end.
    """
    low, high = _load_code_halves(base_ptr, row_offsets, stride_x, token_mask, HALF, HALF_TILE, BITS)
    if BITS == 16:
        low = low.to(COMPUTE)
        high = high.to(COMPUTE)
    else:
        low = _codes_to_float(low, FP16_CODES)
        high = _codes_to_float(high, FP16_CODES)
        low = _apply_group_affine(low, scale_ptr, zero_ptr, scale_row_offsets, 0, stride_g, token_mask, HALF,
                                  HALF_TILE, GROUP)  # fmt: skip
        high = _apply_group_affine(high, scale_ptr, zero_ptr, scale_row_offsets, 1, stride_g, token_mask, HALF,
                                   HALF_TILE, GROUP)  # fmt: skip
        low = low.to(COMPUTE)
        high = high.to(COMPUTE)
    return low, high


@triton.jit
def _apply_channel_affine(
    codes, scale_ptr, zero_ptr, block_rows, half_index, stride_s, stride_g, token_mask,
    HALF: tl.constexpr, HALF_TILE: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """x = code * scale + zero, in the codes' dtype, for one (BLOCK_N, HALF_TILE) half of per-channel codes: channel
    d of a token's block has its scale / zero at the block's first slot (`block_rows`: its offset) + d // WIDTH,
    column d % WIDTH (slot layout, WIDTH = head_dim / block); padding columns read 0."""
    cols = tl.arange(0, HALF_TILE)
    channels = half_index * HALF + cols
    mask = token_mask[:, None]
    if HALF_TILE != HALF:
        mask = mask & (cols < HALF)[None, :]
    offsets = block_rows[:, None] + ((channels // WIDTH) * stride_s + (channels % WIDTH) * stride_g)[None, :]
    scale = tl.load(scale_ptr + offsets, mask=mask, other=0).to(codes.dtype)
    zero = tl.load(zero_ptr + offsets, mask=mask, other=0).to(codes.dtype)
    return codes * scale + zero


@triton.jit
def load_channel_halves(
    base_ptr, scale_ptr, zero_ptr, row_offsets, slots, stride_x, stride_s, stride_g, token_mask,
    HALF: tl.constexpr, HALF_TILE: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
    FP16_CODES: tl.constexpr,
):  # fmt: skip
    """load_token_halves for keys quantized per channel over blocks of BLOCK tokens (KVStore.k_block): the tokens'
    codes load as per-token codes do; each (token, channel) takes the scale / zero of its block in slot layout
    (`slots`: the tokens' slots in their row's one page, as the store is contiguous; scale / zero strides stride_s
    per slot, stride_g per column)."""
    low, high = _load_code_halves(base_ptr, row_offsets, stride_x, token_mask, HALF, HALF_TILE, BITS)
    low = _codes_to_float(low, FP16_CODES)
    high = _codes_to_float(high, FP16_CODES)
    WIDTH: tl.constexpr = 2 * HALF // BLOCK
    block_rows = ((slots // BLOCK) * BLOCK).to(tl.int64) * stride_s
    low = _apply_channel_affine(low, scale_ptr, zero_ptr, block_rows, 0, stride_s, stride_g, token_mask, HALF,
                                HALF_TILE, WIDTH)  # fmt: skip
    high = _apply_channel_affine(high, scale_ptr, zero_ptr, block_rows, 1, stride_s, stride_g, token_mask, HALF,
                                 HALF_TILE, WIDTH)  # fmt: skip
    return low.to(COMPUTE), high.to(COMPUTE)


# Addressing a store's tokens (docs/STORAGE_LAYOUT.md), specialised at compile time per store (see
# store_access.store_addressing for the rule the launchers apply):
#   CONTIGUOUS  - every row's tokens lie in one page (block table of one column: the contiguous store, or a paged
#                 store of one page per row): the row's page table[b, 0] is read once per program, outside the tile
#                 loop, and folded into the row's base pointers; a token's slot is the token itself (no per-token
#                 table load, no division).
#   PAGE_SHIFT >= 0 - pages of 2**PAGE_SHIFT slots: page index and slot by a shift and a mask.
#   otherwise   - any page size: by a runtime division.


@triton.jit
def row_page(table_ptr, table_row, CONTIGUOUS: tl.constexpr):
    """The one page of the row (int64) in CONTIGUOUS mode, else 0: fold `row_page * stride_p` into base pointers."""
    if CONTIGUOUS:
        page = tl.load(table_ptr + table_row).to(tl.int64)
    else:
        page = (table_row * 0).to(tl.int64)
    return page


@triton.jit
def token_pages(
    table_ptr, table_row, tokens, token_mask, page_size, CONTIGUOUS: tl.constexpr, PAGE_SHIFT: tl.constexpr
):  # fmt: skip
    """Map logical token indices (>= 0) of one row to (page as int64, slot) through its block-table row. In
    CONTIGUOUS mode the page is the row's own page, already folded into the base pointers: (0, token)."""
    if CONTIGUOUS:
        page = tl.zeros_like(tokens).to(tl.int64)  # unused (token_rows ignores it)
        slot = tokens
    else:
        if PAGE_SHIFT >= 0:
            index = tokens >> PAGE_SHIFT
            slot = tokens & ((1 << PAGE_SHIFT) - 1)
        else:
            index = tokens // page_size
            slot = tokens % page_size
        # page ids are < 2**32: zero-extending them to int64 is cheaper than sign-extending
        page = tl.load(table_ptr + table_row + index, mask=token_mask, other=0).to(tl.uint32).to(tl.int64)
    return page, slot


@triton.jit
def token_rows(page, slot, stride_p, stride_s, CONTIGUOUS: tl.constexpr, WIDE: tl.constexpr = False):
    """Offsets of tokens (page, slot) from their row's base pointer: slot * stride_s in CONTIGUOUS mode (int32, or
    int64 when WIDE), else page * stride_p + slot * stride_s (int64).

    WIDE is for the per-token scale / zero loads of the register-dequantization path (load_token_halves): with
    int32 offsets Triton 3.9 rematerialises those small loads in the dot-operand layout (several redundant loads
    per thread) instead of loading once per token and exchanging through shared memory; int64 offsets tip its cost
    model back (fewer SASS instructions in the tile loop on sm_90, eval/kernel_instruction_counts.py). Code tiles
    keep int32 offsets (fewer instructions there)."""
    if CONTIGUOUS:
        if WIDE:
            rows = slot.to(tl.int64) * stride_s
        else:
            rows = slot * stride_s
    else:
        rows = page * stride_p + slot * stride_s
    return rows
