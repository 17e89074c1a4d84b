"""Budget and selection arithmetic of a compression, as functions of values (KVPressLayer.compress and its decode-time
eviction call them): per-row budgets, per-row top-k with masked filler slots, complements of evicted indices."""
from __future__ import annotations

import torch


def row_budgets(press, logical_length: int, stored: int, n_pad: list[int], kv_start: list[int],
                layer_idx: int = 0, n_layers: int = 1) -> list[int]:
    """Tokens to keep per row: the press's budget for layer `layer_idx` of `n_layers` pressed layers
    (press.layer_budget) of the row's real logical length (logical_length - n_pad[b]), so batch rows match batch 1,
    and at most the row's attended stored tokens (stored - kv_start[b])."""
    return [min(stored - start, press.layer_budget(logical_length - pad, layer_idx, n_layers))
            for pad, start in zip(n_pad, kv_start)]


def select_with_fillers(press, scores: torch.Tensor, valid: torch.Tensor, budgets: list[int],
                        n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: its top budget tokens, preceded by (n_keep - budget) masked filler slots. Returns the kept indices
    (B, Hkv, n_keep) and the filler count per row (B,) int32."""
    rows = []
    for b, budget in enumerate(budgets):
        kept = press.select(scores[b : b + 1], budget, valid[b : b + 1])  # (1, H, budget) ascending
        n_fill = n_keep - budget
        if n_fill:
            taken = torch.zeros(scores.shape[1], scores.shape[2], dtype=torch.bool, device=scores.device)
            taken.scatter_(1, kept[0].to(scores.device), True)
            free = torch.argsort(taken.to(torch.int8), dim=1, stable=True)[:, :n_fill]
            kept = torch.cat([free.sort(dim=1).values[None], kept.to(free.device)], dim=2)
        rows.append(kept)
    fillers = torch.tensor([n_keep - b for b in budgets], dtype=torch.int32, device=scores.device)
    return torch.cat(rows, dim=0), fillers


def complement(victims: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted indices in [0, n) not in victims (B, H, E): (B, H, n - E)."""
    drop = torch.zeros(*victims.shape[:2], n, dtype=torch.bool, device=victims.device)
    drop.scatter_(2, victims, True)
    order = torch.argsort(drop.to(torch.int8), dim=2, stable=True)
    return order[:, :, : n - victims.shape[2]]
