"""Exact log-sum-exp merge of two partial attentions over disjoint key sets (e.g. stored past + new chunk)."""
import torch


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (out_a, lse_a) and (out_b, lse_b), outs (..., D) and natural-log lses (...), into float32 (out, lse).

    A side with lse = -inf (no keys) gets weight 0 even if its out is garbage; both empty gives out 0, lse -inf.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise ValueError(
            f"need out_a, out_b shaped (..., D) and lse_a, lse_b shaped (...); got {tuple(out_a.shape)}, "
            f"{tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    nonempty = total > 0
    part_a = torch.where(weight_a[..., None] > 0, out_a.float() * weight_a[..., None], 0.0)
    part_b = torch.where(weight_b[..., None] > 0, out_b.float() * weight_b[..., None], 0.0)
    out = (part_a + part_b) / torch.where(nonempty, total, 1.0)[..., None]
    lse = torch.where(nonempty, top + torch.log(torch.where(nonempty, total, 1.0)), float("-inf"))
    return out, lse
