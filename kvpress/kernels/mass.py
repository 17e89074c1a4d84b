"""H2O's per-step attention mass from the logits the fused decode stored (multi.py, `scores=`): for every stored
token, the sum over its kv group's query heads of exp2(logit - lse * log2(e)), added in place to the running mass.
One small pass over B x Hq x L floats instead of a second pass over the keys."""
import torch

from kvpress.kernels.reference import LOG2E
from kvpress.kernels.triton_compat import cdiv, next_power_of_2, require_triton, tl, triton


def check_mass_args(mass: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None):
    """mass float32 (B, Hkv, L); scores float32 (B, Hq, L) with Hq a multiple of Hkv; lse (B, Hq); kv_start (B,)."""
    if mass.dtype != torch.float32 or scores.dtype != torch.float32 or mass.dim() != 3 or scores.dim() != 3:
        raise ValueError(
            f"mass and scores must be float32 (B, Hkv, L) and (B, Hq, L); got {mass.dtype} {tuple(mass.shape)} "
            f"and {scores.dtype} {tuple(scores.shape)}"
        )
    batch, kv_heads, length = mass.shape
    if scores.shape[0] != batch or scores.shape[2] != length or scores.shape[1] % max(kv_heads, 1):
        raise ValueError(f"scores {tuple(scores.shape)} do not match mass {tuple(mass.shape)} (B, Hq = k*Hkv, L)")
    if tuple(lse.shape) != tuple(scores.shape[:2]):
        raise ValueError(f"lse must be (B, Hq) = {tuple(scores.shape[:2])}; got {tuple(lse.shape)}")
    if kv_start is not None and tuple(kv_start.shape) != (batch,):
        raise ValueError(f"kv_start must be (B,) = ({batch},); got {tuple(kv_start.shape)}")


def add_score_mass_reference(
    mass: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None
) -> torch.Tensor:
    """Torch twin: mass[b, h, t] += sum over the group's heads g of exp2(scores[b, g, t] - lse[b, g] * log2(e)) for
    t >= kv_start[b] (earlier columns - left padding, never written by the decode - are not read). Returns mass."""
    check_mass_args(mass, scores, lse, kv_start)
    batch, kv_heads, length = mass.shape
    shift = torch.where(lse == -torch.inf, torch.inf, lse.float() * LOG2E)  # rows that attended nothing add 0
    probs = torch.exp2(scores - shift[:, :, None]).view(batch, kv_heads, -1, length).sum(2)
    if kv_start is not None:
        padding = torch.arange(length, device=mass.device)[None, None, :] < kv_start[:, None, None]
        probs = probs.masked_fill(padding, 0.0)
    return mass.add_(probs)


@triton.jit
def _add_score_mass_kernel(
    mass_ptr, scores_ptr, lse_ptr, start_ptr,
    stride_mb, stride_mh, stride_sb, stride_sh, stride_lb, stride_lh,
    kv_heads, group, length,
    HAS_START: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_T tokens of one (row, kv head), summing its group's heads."""
    pid_bh = tl.program_id(0)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < length
    if HAS_START:
        token_mask = token_mask & (tokens >= tl.load(start_ptr + b))
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    head_mask = tl.arange(0, BLOCK_G) < group
    lse = tl.load(lse_ptr + b * stride_lb + heads * stride_lh, mask=head_mask, other=float("-inf"))
    shift = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    rows = scores_ptr + b.to(tl.int64) * stride_sb + heads.to(tl.int64) * stride_sh
    logits = tl.load(rows[:, None] + tokens[None, :], mask=head_mask[:, None] & token_mask[None, :], other=0.0)
    probs = tl.where(head_mask[:, None] & token_mask[None, :], tl.exp2(logits - shift[:, None]), 0.0)
    out = mass_ptr + b.to(tl.int64) * stride_mb + kv_head.to(tl.int64) * stride_mh + tokens
    tl.store(out, tl.load(out, mask=token_mask, other=0.0) + tl.sum(probs, 0), mask=token_mask)


def add_score_mass_triton(
    mass: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None
) -> torch.Tensor:
    """Triton twin of add_score_mass_reference (one launch, in place)."""
    require_triton()
    check_mass_args(mass, scores, lse, kv_start)
    batch, kv_heads, length = mass.shape
    if mass.numel() == 0:
        return mass
    if mass.stride(2) != 1 or scores.stride(2) != 1:
        raise ValueError("mass and scores need unit stride along their last (token) dimension")
    group = scores.shape[1] // kv_heads
    block_t = 256
    _add_score_mass_kernel[(batch * kv_heads, cdiv(length, block_t))](
        mass, scores, lse, kv_start if kv_start is not None else lse,
        mass.stride(0), mass.stride(1), scores.stride(0), scores.stride(1), lse.stride(0), lse.stride(1),
        kv_heads, group, length,
        HAS_START=kv_start is not None, BLOCK_G=next_power_of_2(group), BLOCK_T=block_t,
    )  # fmt: skip
    return mass
