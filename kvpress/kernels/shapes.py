"""The shapes the Triton kernels take, checked once before any work (kvpress/config.py calls it at wrap /
KVPressCache(...) when the kernels will run on Triton): head_dim, padded in the tile to a power of two, and the code
widths and groups of each quantized field. Plain Python (no torch, no triton).

The attention kernels work in two halves of the head dim, each a tile of `half_tile(head_dim)` columns (columns past
head_dim / 2 are masked: head_dim 96 runs in tiles of 64); a group of codes lies in one half, or covers the whole
head. The quantize-and-store kernel sees 2-bit codes as four quarters, so a 2-bit group also lies in one quarter or
covers whole quarters (docs/STORAGE_LAYOUT.md).
"""
from __future__ import annotations

from collections.abc import Iterable

MAX_TRITON_HEAD_DIM = 256  # the largest head_dim the tiles are sized (and tested) for
MIN_TILE = 16  # tl.dot needs operands of at least 16 along each dimension


def half_tile(head_dim: int) -> int:
    """Columns of the tile holding one half of the head dim: head_dim / 2 rounded up to a power of two (>= 16)."""
    half = head_dim // 2
    return max(MIN_TILE, 1 << (half - 1).bit_length()) if half > 0 else MIN_TILE


def _tiles_group(span: int, group: int) -> bool:
    """Whether groups of `group` elements tile `span` columns padded to a power of two (a power-of-two group that
    divides it, or the whole span)."""
    return group == span or (span % group == 0 and group & (group - 1) == 0)


def group_problem(head_dim: int, bits: int, group: int) -> str | None:
    """Why the kernels cannot read `bits`-bit codes of `head_dim` in groups of `group` (None: they can)."""
    half, quarter = head_dim // 2, head_dim // 4
    if group == head_dim:
        return None
    if not _tiles_group(half, group):
        return (f"a group must be head_dim={head_dim}, head_dim/2={half} or a power of two dividing {half} (a group "
                f"lies in one half of the tile); got {group}")
    if bits == 2 and not (group == half or quarter % group == 0):
        return (f"a 2-bit group must divide head_dim/4={quarter} (the quantize kernel packs quarters) or be {half} or "
                f"{head_dim}; got {group}, which straddles two quarters")
    return None


def kernel_shape_problem(head_dim: int, fields: Iterable[tuple[str, int, int | None]]) -> str | None:
    """Why the Triton kernels cannot take `head_dim` with `fields` ((name, bits, group or None for one group per
    token) of each stored field: bits 16 = unquantized), or None when they can."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        return f"head_dim must be an even int >= 2; got {head_dim!r}"
    if head_dim > MAX_TRITON_HEAD_DIM:
        return f"head_dim {head_dim} is larger than the {MAX_TRITON_HEAD_DIM} the kernels' tiles are sized for"
    for name, bits, group in fields:
        if bits == 16:
            continue
        if bits == 2 and head_dim % 4:
            return f"{name}: 2-bit codes pack four per byte, so head_dim must be a multiple of 4; got {head_dim}"
        problem = group_problem(head_dim, bits, head_dim if group is None else group)
        if problem is not None:
            return f"{name}_group: {problem}"
    return None


def check_kernel_shapes(head_dim: int, fields: Iterable[tuple[str, int, int | None]]) -> None:
    """Raise ValueError (naming the limit) unless the Triton kernels take `head_dim` and `fields` (see
    kernel_shape_problem)."""
    problem = kernel_shape_problem(head_dim, fields)
    if problem is not None:
        raise ValueError(f"the Triton kernels cannot run this cache: {problem} (use the reference backend: "
                         "kvpress.kernels.use_backend('reference') or KVPRESS_KERNELS=reference)")
