"""Asymmetric per-group min/max quantization of KV vectors to 8, 4 or 2 bits (pure torch): the bytes every affine
store holds, which the quantize-and-store kernel reproduces exactly. A leaf of kvpress.kernels.

Per group with minimum `lo` and maximum `hi` (float32), with `L = 2**bits` levels:
  zero  = fp16_round_down(lo + (hi - lo) * (0.5 / L))
  scale = fp16_round_up(max((hi - zero) / (L - 0.5), 2 * (zero - lo), SCALE_FLOOR))
  q     = clamp(floor((x - zero) / scale + 0.5), 0, L - 1)
Scale and zero are rounded to fp16 *before* quantizing, and the scale is chosen against the rounded
zero so that the grid [zero - scale/2, zero + (L - 0.5) * scale] covers [lo, hi]: clamping never adds
error and every element satisfies |x - (q * scale + zero)| <= scale / 2 (up to fp32 rounding).
Rounding the zero down costs the scale only (rounding error) / (L - 0.5); rounding it up would cost 2x.
Every step is an IEEE op (the divisions are true divisions), so kernels can reproduce the bytes exactly.
"""
from __future__ import annotations

import torch

from kvpress.kernels.affine_layout import code_width, effective_group_size, pack_codes, unpack_codes

SCALE_FLOOR = 2.0**-24  # smallest positive fp16: constant groups still get a nonzero scale
FP16_MAX = 65504.0


def round_up_to_fp16(value: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest fp16 that is >= them (the grid must keep covering the data)."""
    nearest = value.to(torch.float16)
    return torch.where(nearest < value, torch.nextafter(nearest, nearest.new_full((), float("inf"))), nearest)


def round_down_to_fp16(value: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest fp16 that is <= them."""
    nearest = value.to(torch.float16)
    return torch.where(nearest > value, torch.nextafter(nearest, nearest.new_full((), float("-inf"))), nearest)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale fp16, zero fp16, zero as float32) for float32 group minima/maxima; see the module doc. Any width 1-8:
    the math does not depend on it, only packing does (quantize checks the stored widths)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int from 1 to 8, got {bits!r}")
    levels = 2**bits
    zero = round_down_to_fp16(lo + (hi - lo) * (0.5 / levels))
    zero_f = zero.float()
    # A 0-dim tensor on the same device keeps this a true IEEE division on every backend
    # (a Python scalar divisor becomes a reciprocal multiply on CUDA).
    steps = torch.full((), levels - 0.5, dtype=torch.float32, device=lo.device)
    needed = torch.maximum((hi - zero_f) / steps, (zero_f - lo) * 2.0).clamp_min_(SCALE_FLOOR)
    return round_up_to_fp16(needed), zero, zero_f


def group_scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) for groups with float32 minima `lo` and maxima `hi` (formula in module doc)."""
    scale, zero, _ = _scale_zero(lo, hi, bits)
    return scale, zero


def quantize(
    x: torch.Tensor, bits: int, group_size: int | None, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x[..., D]` to (codes uint8 `[..., D or D/2]`, scale fp16 `[..., G]`, zero fp16 `[..., G]`).

    4-bit codes are packed with split halves, 2-bit codes with split quarters. Raises ValueError if `x` holds
    NaN/inf or a group whose
    scale or zero overflows fp16 (checked on the G-sized scale/zero, so it is cheap); check_finite=False
    skips the check (NaN input then gives NaN scale/zero).
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError("quantize expects a floating-point tensor with head_dim as its last dimension")
    head_dim = x.shape[-1]
    group = effective_group_size(head_dim, bits, group_size)
    grouped = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    codes, scale, zero = affine_codes(grouped, -1, bits, check_finite)
    return pack_codes(codes.reshape(x.shape), bits), scale, zero


def affine_codes(
    grouped: torch.Tensor, dim: int, bits: int, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked uint8 codes of float32 `grouped` whose groups run along `dim`, with their fp16 (scale, zero) (that
    dim reduced away); see the module doc for the steps. Any width 1-8 (eval/quant_codec_sim.py simulates 3-bit
    codes with it); quantize and quantize_channels pack the stored widths."""
    lo, hi = torch.aminmax(grouped, dim=dim)
    scale, zero, zero_f = _scale_zero(lo, hi, bits)
    scale_f = scale.float()
    # |scale|, |zero| <= 65504 keep their difference finite; NaN or inf anywhere makes it non-finite.
    if check_finite and not bool(((scale_f - zero_f).abs() < float("inf")).all()):
        raise ValueError(
            "quantize got NaN/inf, or a group whose scale or zero overflows the fp16 range; clean or rescale the input"
        )
    codes = (grouped - zero_f.unsqueeze(dim)).div_(scale_f.unsqueeze(dim)).add_(0.5).floor_()
    return codes.clamp_(0, 2**bits - 1).to(torch.uint8), scale, zero


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild `x[..., head_dim]` = q * scale + zero (computed in float32, returned as `dtype`)."""
    group = effective_group_size(head_dim, bits, group_size)
    n_groups = head_dim // group
    if q.dtype != torch.uint8 or q.dim() == 0 or q.shape[-1] != code_width(head_dim, bits):
        raise ValueError(
            f"dequantize expects uint8 codes with last dim {code_width(head_dim, bits)} for {bits}-bit "
            f"head_dim={head_dim}, got {q.dtype} {tuple(q.shape)}"
        )
    lead = q.shape[:-1]
    if scale.shape != (*lead, n_groups) or zero.shape != scale.shape:
        raise ValueError(
            f"dequantize expects scale and zero of shape {(*lead, n_groups)}, "
            f"got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    codes = unpack_codes(q, bits)
    grouped = codes.reshape(*lead, n_groups, group).float()
    out = torch.addcmul(zero.float().unsqueeze(-1), grouped, scale.float().unsqueeze(-1))
    return out.reshape(*lead, head_dim).to(dtype)


def check_token_block(head_dim: int, block: int) -> int:
    """Return `block` if keys quantized per channel over blocks of that many tokens fit head_dim: a power of two
    that divides head_dim (each token slot of a block holds the scales of head_dim / block channels), else raise."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(f"a per-channel token block must be a power of two >= 2, got {block!r}")
    if head_dim % block:
        raise ValueError(f"a per-channel token block must divide head_dim={head_dim} (its {block} slots hold the "
                         f"{head_dim} channel scales); got {block}")
    return block


def quantize_channels(
    x: torch.Tensor, bits: int, block: int, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x[..., T, D]` per channel over blocks of `block` tokens (KIVI's keys): one fp16 scale and zero per
    (block, channel), same min/max math as `quantize`. Returns codes packed per token as `quantize` packs them
    `[..., T, D * bits / 8]`, and scale / zero `[..., T, D / block]` in slot layout: the pair of channel d for the
    block of tokens [i * block, (i + 1) * block) sits at token slot i * block + d // (D / block), column
    d % (D / block) (docs/STORAGE_LAYOUT.md), so the fields keep one row per token like every other field."""
    *lead, tokens, head_dim = x.shape
    check_token_block(head_dim, block)
    if tokens % block:
        raise ValueError(f"per-channel codes are written in whole blocks of {block} tokens; got {tokens} tokens")
    blocks = x.float().reshape(*lead, tokens // block, block, head_dim)
    codes, scale, zero = affine_codes(blocks, -2, bits, check_finite)  # scale, zero: (..., n_blocks, D)
    slots = (*lead, tokens, head_dim // block)
    return pack_codes(codes.reshape(x.shape), bits), scale.reshape(slots), zero.reshape(slots)


def dequantize_channels(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, block: int, head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild `x[..., T, head_dim]` from per-channel codes (inverse of quantize_channels, float32 math)."""
    check_token_block(head_dim, block)
    *lead, tokens, width = q.shape
    if q.dtype != torch.uint8 or width != code_width(head_dim, bits) or tokens % block:
        raise ValueError(f"dequantize_channels expects uint8 codes (..., T, {code_width(head_dim, bits)}) with T a "
                         f"multiple of {block}, got {q.dtype} {tuple(q.shape)}")
    slots = (*lead, tokens, head_dim // block)
    if tuple(scale.shape) != slots or tuple(zero.shape) != slots:
        raise ValueError(f"dequantize_channels expects scale and zero of shape {slots}, got {tuple(scale.shape)} "
                         f"and {tuple(zero.shape)}")
    per_block = (*lead, tokens // block, 1, head_dim)
    codes = unpack_codes(q, bits).reshape(*lead, tokens // block, block, head_dim).float()
    out = torch.addcmul(zero.float().reshape(per_block), codes, scale.float().reshape(per_block))
    return out.reshape(*lead, tokens, head_dim).to(dtype)
