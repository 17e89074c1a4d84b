"""How affine codes sit in a field: supported bit widths, group geometry along head_dim, split-halves int4 and
split-quarters int2 packing.

A leaf of kvpress.kernels (torch only), shared by the quantize-and-store kernel, its torch twin and the
codecs, so all of them accept and reject the same shapes (docs/STORAGE_LAYOUT.md).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
PACKED_PER_BYTE = {2: 4, 4: 2, 8: 1}  # codes per byte


def check_bits(bits: int, name: str = "bits") -> int:
    """Return `bits` if it is a supported code width (2, 4 or 8), else raise ValueError naming `name`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def effective_group_size(head_dim: int, bits: int, group_size: int | None) -> int:
    """Return the number of head-dim elements per group (None means one group of head_dim).

    Raises ValueError if the group does not tile head_dim, or, for packed (4- or 2-bit) codes, if it would straddle
    the two halves the kernels work in (it must divide head_dim / 2 or equal head_dim; docs/STORAGE_LAYOUT.md).
    """
    check_bits(bits)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    per_byte = PACKED_PER_BYTE[bits]
    if head_dim % per_byte:
        raise ValueError(f"{bits}-bit codes pack {per_byte} values per byte, so head_dim must be a multiple of "
                         f"{per_byte}; got {head_dim}")
    if group_size is None or group_size == head_dim:
        return head_dim
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if bits < 8:
        if (head_dim // 2) % group_size:
            raise ValueError(
                f"a {bits}-bit group_size must divide head_dim/2={head_dim // 2} or equal head_dim={head_dim}; "
                f"got {group_size} (pick a smaller power of two, or None for one group)"
            )
    elif head_dim % group_size:
        raise ValueError(
            f"group_size must divide head_dim={head_dim}; got {group_size} (or use None for one group)"
        )
    return group_size


def group_count(head_dim: int, bits: int, group_size: int | None) -> int:
    """Number of (scale, zero) pairs per token and head: head_dim / effective group size."""
    return head_dim // effective_group_size(head_dim, bits, group_size)


def code_width(head_dim: int, bits: int) -> int:
    """Bytes of codes per token and head: head_dim for 8-bit, head_dim / 2 for 4-bit, head_dim / 4 for 2-bit."""
    return head_dim // PACKED_PER_BYTE[check_bits(bits)]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes `[..., D]` (values 0..15, D even) into `[..., D/2]` bytes: byte j = q[j] | q[j + D/2] << 4.

    Only the low 4 bits of each code are kept; the codec never produces larger values. Split halves let a kernel
    load D/2 bytes and get two contiguous half-vectors.
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4 expects uint8 codes, got {q.dtype}; cast the codes to torch.uint8 first")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    half = q.shape[-1] // 2
    return (q[..., :half] & 0x0F) | (q[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack `[..., D/2]` split-halves bytes into uint8 codes `[..., D]` (inverse of pack_int4)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 bytes, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dimension")
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes `[..., D]` (values 0..3, D divisible by 4) into `[..., D/4]` bytes ("split quarters"):
    byte j = q[j] | q[j + D/4] << 2 | q[j + D/2] << 4 | q[j + 3D/4] << 6.

    Bits 0-3 of the bytes hold the first half of the head dim and bits 4-7 the second, so a kernel working in two
    halves reads the same D/4 bytes for both and picks its quarters by shifts, as with int4's split halves."""
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int2 expects uint8 codes, got {q.dtype}; cast the codes to torch.uint8 first")
    if q.dim() == 0 or q.shape[-1] % 4:
        raise ValueError(f"pack_int2 needs a last dimension divisible by 4, got shape {tuple(q.shape)}")
    quarter = q.shape[-1] // 4
    parts = [q[..., i * quarter : (i + 1) * quarter] & 3 for i in range(4)]
    return parts[0] | (parts[1] << 2) | (parts[2] << 4) | (parts[3] << 6)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """Unpack `[..., D/4]` split-quarters bytes into uint8 codes `[..., D]` (inverse of pack_int2)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int2 expects uint8 bytes, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_int2 needs at least one dimension")
    return torch.cat([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[..., D]` as stored for `bits` (8-bit: unchanged)."""
    return {2: pack_int2, 4: pack_int4}.get(check_bits(bits), lambda codes: codes)(q)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes back to one uint8 per element `[..., D]` (inverse of pack_codes)."""
    return {2: unpack_int2, 4: unpack_int4}.get(check_bits(bits), lambda codes: codes)(packed)
