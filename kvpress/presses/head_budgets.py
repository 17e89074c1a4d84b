"""Per-head budgets: how a row's kept tokens are shared out over heads by score instead of equally.

`uniform`: every kv head keeps the layer's budget. `adaptive` (AdaKV, Feng et al. 2024): a layer keeps the same
total (budget x kv heads) per row, taken by score over all its heads at once, so heads whose attention is spread keep
more and focused heads less. `global` (KVzip's allocation): one total per row over every pressed layer and head.
Both first give each head its `HEAD_FLOOR` share of the uniform budget (AdaKV's safeguard), its forced tokens
(sinks, recent) included. Scores must be comparable across heads (attention probabilities are: SnapKV, TOVA, H2O,
KVzip, Expected Attention). Pure torch on (row, heads, tokens) rankings; the cache stores the result.
"""
from __future__ import annotations

import math

import torch

BUDGET_MODES = ("uniform", "adaptive", "global")
HEAD_FLOOR = 0.2  # AdaKV's alpha: each head keeps at least this fraction of the uniform per-head budget


def rank_scores(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """(B, H, T) float32 ranking of press scores: NaN / inf clamped to the finite range, padding (valid (B, T) False)
    -inf below every real token, forced tokens (B, T) +inf above them."""
    finite_max = torch.finfo(torch.float32).max
    ranked = torch.nan_to_num(scores.float(), nan=-finite_max, posinf=finite_max, neginf=-finite_max)
    ranked = ranked.masked_fill(~valid[:, None, :], float("-inf"))
    return ranked.masked_fill(forced[:, None, :], float("inf"))


def head_floor(per_head: int) -> int:
    """Tokens every head keeps before the rest is shared out by score."""
    return min(per_head, math.ceil(HEAD_FLOOR * per_head))


def keep_by_score(ranked: torch.Tensor, per_head: int) -> torch.Tensor:
    """(N, T) bool: `per_head * N` tokens of one row's N heads (of one layer, or of every layer for `global`), each
    head's best head_floor(per_head) first, then the best of the rest over all heads. Forced tokens (+inf) are kept
    as long as a head's forced count <= per_head (BasePress.n_keep guarantees it)."""
    n_heads, n_tokens = ranked.shape
    per_head = min(per_head, n_tokens)
    floor = head_floor(per_head)
    boosted = ranked.clone()
    if floor:
        boosted.scatter_(1, torch.topk(ranked, floor, dim=1).indices, float("inf"))
    chosen = torch.topk(boosted.reshape(-1), per_head * n_heads).indices
    keep = torch.zeros(n_heads * n_tokens, dtype=torch.bool, device=ranked.device)
    keep[chosen] = True
    return keep.view(n_heads, n_tokens)


def keep_per_head(ranked: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """Keep masks (B, H, T) bool, one per ranking (B, H, T) of `ranked` (one layer: adaptive; every pressed layer:
    global), sharing row b's total budgets[b] x (heads of every ranking) over all of them by score."""
    masks = [torch.zeros_like(r, dtype=torch.bool) for r in ranked]
    for b, per_head in enumerate(budgets):
        rows = torch.cat([r[b] for r in ranked], dim=0)  # (sum of heads, T)
        kept = keep_by_score(rows, per_head)
        offset = 0
        for mask, r in zip(masks, ranked):
            mask[b] = kept[offset : offset + r.shape[1]]
            offset += r.shape[1]
    return masks
