"""Reading a (quantized, paged) KV store in torch: argument checks shared by every attention kernel, page
gathering through block tables, and dequantization of gathered codes (docs/STORAGE_LAYOUT.md)."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StoreGeometry:
    """Sizes shared by a query tensor and one KV store, resolved and checked once per call."""

    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    head_dim: int
    page_size: int
    k_group: int
    v_group: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.q_heads // self.kv_heads


def _check_field(name: str, field: torch.Tensor, bits: int, head_dim: int) -> None:
    """Check dtype and last-dim width of one stored field (k or v) for its bit width."""
    if field.dim() != 4:
        raise ValueError(f"{name} must have shape (P, Hkv, S, X); got shape {tuple(field.shape)}")
    if bits == 16:
        if not field.is_floating_point():
            raise ValueError(f"{name} with {name}_bits=16 must be a floating tensor; got {field.dtype}")
        width = head_dim
    elif bits in (4, 8):
        if field.dtype != torch.uint8:
            raise ValueError(f"{name} with {name}_bits={bits} must be uint8 codes; got {field.dtype}")
        width = head_dim // 2 if bits == 4 else head_dim
    else:
        raise ValueError(f"{name}_bits must be 4, 8 or 16; got {bits}")
    if field.shape[-1] != width:
        raise ValueError(
            f"{name} last dim must be {width} for {bits}-bit codes of head_dim {head_dim}; got {field.shape[-1]}"
        )


def _resolve_group(
    name: str, field: torch.Tensor, scale, zero, bits: int, group: int | None, head_dim: int
) -> int:
    """Check the scale/zero fields of a quantized field and return its group size (head_dim when unquantized)."""
    if bits == 16:
        if scale is not None or zero is not None:
            raise ValueError(f"{name}_scale and {name}_zero must be None when {name}_bits=16")
        return head_dim
    if scale is None or zero is None:
        raise ValueError(f"{name}_scale and {name}_zero are required when {name}_bits={bits}")
    expected = tuple(field.shape[:3])
    for label, t in ((f"{name}_scale", scale), (f"{name}_zero", zero)):
        if t.dim() != 4 or tuple(t.shape[:3]) != expected or not t.is_floating_point():
            raise ValueError(
                f"{label} must be a floating tensor shaped (P, Hkv, S, G) with (P, Hkv, S) = {expected}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if scale.shape != zero.shape or scale.stride() != zero.stride():
        raise ValueError(f"{name}_scale and {name}_zero must have the same shape and strides")
    n_groups = scale.shape[-1]
    if n_groups == 0 or head_dim % n_groups != 0:
        raise ValueError(f"{name}_scale has {n_groups} groups, which does not divide head_dim {head_dim}")
    resolved = head_dim // n_groups
    if group is not None and group != resolved:
        raise ValueError(f"{name}_group={group} disagrees with {name}_scale width {n_groups} (head_dim {head_dim})")
    if bits == 4 and resolved != head_dim and (head_dim // 2) % resolved != 0:
        raise ValueError(
            f"{name}_group={resolved} must divide head_dim/2={head_dim // 2} or equal head_dim for 4-bit codes"
        )
    return resolved


def check_store_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_group: int | None,
    v_group: int | None,
    int_bounds: bool = False,
) -> StoreGeometry:
    """Check q (B, Hq, Q, D) against the store fields and row bounds; raise ValueError naming the problem.

    Pass v=None to check keys only (attention_scores). Values of block_table/kv_start/kv_end are not read
    here (that would synchronise a GPU); the torch twins check them, the Triton kernels trust them.
    `int_bounds`: kv_start / kv_end may also be non-negative Python ints (one bound for every row; the
    multi-store decode takes them).
    """
    if q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a floating tensor shaped (B, Hq, Q, D); got {q.dtype} {tuple(q.shape)}")
    batch, q_heads, num_queries, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    _check_field("k", k, k_bits, head_dim)
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    k_group_size = _resolve_group("k", k, k_scale, k_zero, k_bits, k_group, head_dim)
    v_group_size = head_dim
    if v is not None:
        _check_field("v", v, v_bits, head_dim)
        if tuple(v.shape[:3]) != tuple(k.shape[:3]):
            raise ValueError(f"k and v must share (P, Hkv, S); got {tuple(k.shape)} and {tuple(v.shape)}")
        v_group_size = _resolve_group("v", v, v_scale, v_zero, v_bits, v_group, head_dim)
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be shaped (B={batch}, max_pages>=1); got {tuple(block_table.shape)}")
    tensor_bounds = []
    for label, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if not isinstance(t, torch.Tensor):
            if not int_bounds or isinstance(t, bool) or not isinstance(t, int) or t < 0:
                kind = "an int32/int64 (B,) tensor or an int >= 0" if int_bounds else "an int32/int64 (B,) tensor"
                raise ValueError(f"{label} must be {kind}; got {t!r}")
            continue
        tensor_bounds.append((label, t))
    for label, t in (("block_table", block_table), *tensor_bounds):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{label} must be int32 or int64; got {t.dtype}")
        if t.device != q.device or k.device != q.device:
            raise ValueError(f"{label}, q and the store must be on one device; got {t.device}, {q.device}, {k.device}")
    if any(tuple(t.shape) != (batch,) for _, t in tensor_bounds):
        raise ValueError(f"kv_start and kv_end must be shaped (B,) = ({batch},)")
    return StoreGeometry(
        batch, q_heads, kv_heads, num_queries, head_dim, k.shape[2], k_group_size, v_group_size
    )


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
    if bits == 4:  # split halves: low nibbles are the first half of the head dim, high nibbles the second
        half = raw.shape[-1]
        values = torch.empty(*raw.shape[:-1], 2 * half, dtype=torch.float32, device=raw.device)
        values[..., :half] = torch.bitwise_and(raw, 15)  # uint8 -> float32 on assignment (CUDA has no
        values[..., half:] = torch.bitwise_right_shift(raw, 4)  # mixed-dtype out= for bitwise ops)
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
