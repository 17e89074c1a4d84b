"""Reading a (quantized, paged) KV store: how the Triton kernels address its tokens, and, for the torch twins, page
gathering through block tables and dequantization of gathered codes (docs/STORAGE_LAYOUT.md)."""
import torch

from kvpress.kernels.affine import dequantize_channels


def store_addressing(block_table: torch.Tensor, page_size: int) -> tuple[bool, int]:
    """(CONTIGUOUS, PAGE_SHIFT): how the Triton kernels address a store's tokens, decided from shapes only (no
    device sync, no read of the table's values).

    CONTIGUOUS when the block table has ONE column: every row's tokens [0, kv_end) lie in its single page
    table[b, 0] (kv_end <= max_pages * page_size = S), which the kernel reads once per program instead of once per
    token, and a token's slot is the token itself. That covers the contiguous store (P = B, table arange(B)[:, None],
    S = its capacity, any number) and is exact for any other one-column table too - a paged store with one page per
    row, with P == B or not, the identity or a permutation or rows sharing one page - since nothing about the
    table's values is assumed. Otherwise PAGE_SHIFT = log2(page_size) for a power-of-two page size (shift and mask),
    else -1 (the general path: runtime division by page_size).
    """
    if block_table.shape[1] == 1:
        return True, -1
    if page_size > 0 and page_size & (page_size - 1) == 0:
        return False, page_size.bit_length() - 1
    return False, -1


# ----------------------------------------------------------------------------------------------------------
# torch twin
# ----------------------------------------------------------------------------------------------------------


def dequantize_codes(
    raw: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None, bits: int, group: int
) -> torch.Tensor:
    """Dequantize gathered codes (..., X) to float32 (..., D): x = q * scale + zero per group of `group` dims."""
    if bits == 16:
        return raw.float()
    if bits in (2, 4):  # split halves / quarters: the lowest bits hold the first part of the head dim
        width, parts = raw.shape[-1], 8 // bits
        values = torch.empty(*raw.shape[:-1], parts * width, dtype=torch.float32, device=raw.device)
        for i in range(parts):  # uint8 -> float32 on assignment (CUDA has no mixed-dtype out= for bitwise ops)
            values[..., i * width : (i + 1) * width] = torch.bitwise_and(raw >> (bits * i), 2**bits - 1)
    else:
        values = raw.to(torch.float32, memory_format=torch.contiguous_format)
    shape = values.shape
    grouped = values.view(*shape[:-1], shape[-1] // group, group)
    grouped.mul_(scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1))
    return values


def _is_contiguous_store(field: torch.Tensor, block_table: torch.Tensor, t_end: int) -> bool:
    """True when row b's tokens [0, t_end) all lie in page b (the contiguous store), so slicing suffices."""
    batch = block_table.shape[0]
    if field.shape[0] != batch or t_end > field.shape[2]:
        return False
    identity = torch.arange(batch, device=block_table.device, dtype=block_table.dtype)
    return bool(torch.equal(block_table[:, 0], identity))


def gather_tokens(
    field: torch.Tensor, block_table: torch.Tensor, t_begin: int, t_end: int, contiguous: bool
) -> torch.Tensor:
    """Return the raw per-token rows of logical tokens [t_begin, t_end) of every row, shaped (B, Hkv, T, X).

    The contiguous store is sliced (a view, no copy); the paged store is gathered in one indexing op.
    """
    if contiguous:
        return field[:, :, t_begin:t_end]
    page_size = field.shape[2]
    positions = torch.arange(t_begin, t_end, device=field.device)
    pages = block_table[:, positions // page_size].long().clamp_(0, field.shape[0] - 1)  # (B, T)
    heads = torch.arange(field.shape[1], device=field.device)
    return field[pages[:, None, :], heads[None, :, None], (positions % page_size)[None, None, :]]


def gather_dequantized(
    field: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    block_table: torch.Tensor,
    t_begin: int,
    t_end: int,
    bits: int,
    group: int,
) -> torch.Tensor:
    """Gather logical tokens [t_begin, t_end) of every row and dequantize them: float32 (B, Hkv, T, D)."""
    contiguous = _is_contiguous_store(field, block_table, t_end)
    raw = gather_tokens(field, block_table, t_begin, t_end, contiguous)
    if bits == 16:
        return dequantize_codes(raw, None, None, bits, group)
    return dequantize_codes(
        raw,
        gather_tokens(scale, block_table, t_begin, t_end, contiguous),
        gather_tokens(zero, block_table, t_begin, t_end, contiguous),
        bits,
        group,
    )


def gather_channel_keys(
    field: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    block_table: torch.Tensor,
    t_begin: int,
    t_end: int,
    bits: int,
    block: int,
) -> torch.Tensor:
    """Keys quantized per channel over blocks of `block` tokens (KVStore.k_block), logical tokens [t_begin, t_end)
    of every row dequantized: float32 (B, Hkv, T, D). The whole blocks around the span are read (their scales sit
    in slot layout across the block, kernels/affine.quantize_channels)."""
    first = t_begin // block * block
    last = -(-t_end // block) * block
    contiguous = _is_contiguous_store(field, block_table, last)
    codes, scales, zeros = (gather_tokens(t, block_table, first, last, contiguous) for t in (field, scale, zero))
    head_dim = field.shape[-1] * 8 // bits
    keys = dequantize_channels(codes, scales, zeros, bits, block, head_dim)
    return keys[:, :, t_begin - first : t_end - first]


def token_span(
    kv_start: torch.Tensor, kv_end: torch.Tensor, block_table: torch.Tensor, page_size: int
) -> tuple[int, int]:
    """Return (min kv_start, max kv_end) after checking 0 <= kv_start <= kv_end <= max_pages * page_size."""
    if kv_start.numel() == 0:
        return 0, 0
    capacity = block_table.shape[1] * page_size
    if bool((kv_start < 0).any()) or bool((kv_end < kv_start).any()) or int(kv_end.max()) > capacity:
        raise ValueError(f"need 0 <= kv_start <= kv_end <= max_pages * page_size = {capacity} for every row")
    return int(kv_start.min()), int(kv_end.max())
