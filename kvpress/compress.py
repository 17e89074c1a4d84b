"""Apply a press to a layer: after each prefill chunk (top-k per head) and, for bounded presses, before each decode
step (evict the lowest accumulated attention). The press only scores and selects; the layer owns storage.
"""
from __future__ import annotations

import torch

from .presses.attention_mass import accumulate_attention_mass, decode_victims


def observe_chunk(layer, query: torch.Tensor, scaling: float) -> None:
    """After a prefill chunk is stored: accumulate H2O mass, keep the last window of queries, mark for compression."""
    press, kv = layer.press, layer.kv
    if press.needs_attention_mass:
        k_all, _ = kv.dequantized(query.shape[-1], query.dtype)
        mass = accumulate_attention_mass(query, k_all, scaling, layer.valid_mask(), kv.length - query.shape[2])
        layer.mass = mass if layer.mass is None else layer.mass + mass
    window = press.query_window
    if window:
        recent = query if layer.window_queries is None else torch.cat([layer.window_queries, query], dim=2)
        layer.window_queries = recent[:, :, -window:]
    layer.needs_compression = True


def compress(layer, scaling: float) -> None:
    """Score every stored token and keep each row's budget (same count per head); frees the evicted memory."""
    press, kv = layer.press, layer.kv
    layer.needs_compression = False
    queries, layer.window_queries = layer.window_queries, None
    budgets = _row_budgets(layer, press)
    n_keep = max(budgets)
    if n_keep >= kv.length:
        return
    k_all, v_all = kv.dequantized(layer.head_dim, layer.dtype)
    valid = layer.valid_mask()
    scores = press.score(k_all, v_all, queries, layer.mass, scaling, valid)
    idx, fillers = _select_with_fillers(press, scores, valid, budgets, n_keep)
    kv.keep(idx, k_all, v_all, n_masked=int(fillers.max()))
    if layer.mass is not None:
        layer.mass = torch.gather(layer.mass, 2, idx.to(layer.mass.device))
    layer.set_kv_start(fillers)
    layer._refresh_views()


def _row_budgets(layer, press) -> list[int]:
    """Tokens to keep per row: the press budget of the row's real logical length (so batch rows match batch 1)."""
    batch = layer.kv.batch_size
    n_pad = layer.n_pad.tolist() if layer.n_pad is not None else [0] * batch
    start = layer.kv_start.tolist() if layer.kv_start is not None else [0] * batch
    stored = layer.kv.length
    return [min(stored - start[b], press.n_keep(layer.logical_length - n_pad[b])) for b in range(batch)]


def _select_with_fillers(press, scores, valid, budgets: list[int], n_keep: int):
    """Per row: its top budget tokens, preceded by (n_keep - budget) masked filler slots; fillers count per row."""
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


def evict_before_decode(layer) -> None:
    """Bounded presses (max_tokens): make room for the next token by evicting the lowest-mass stored tokens.

    Only the quantized middle (or the single fp segment) is touched, so segments stay rectangular.
    """
    press, kv = layer.press, layer.kv
    if press is None or press.max_tokens is None or kv.length < press.max_tokens or layer.mass is None:
        return
    n_evict = kv.length - press.max_tokens + 1
    offset = kv.sink.length if kv.sink is not None else 0
    n_main = kv.main.length
    window_len = kv.window.length if kv.window is not None else 0
    mass_main = layer.mass[:, :, offset : offset + n_main]
    valid_main = None if layer.kv_start is None else layer.valid_mask()[:, offset : offset + n_main]
    protected_sink, protected_recent = max(0, press.n_sink - offset), max(0, press.recent - window_len)
    # a left-padded quantized batch widens the fp sinks by its padding: the bound then exceeds max_tokens by it
    n_evict = min(n_evict, n_main - protected_sink - protected_recent)
    if n_evict <= 0:
        return
    victims = decode_victims(mass_main, n_evict, protected_sink, protected_recent, valid_main)
    keep = _complement(victims, n_main)
    kv.evict_main(keep)
    layer.mass = torch.cat(
        [layer.mass[:, :, :offset], torch.gather(mass_main, 2, keep.to(mass_main.device)),
         layer.mass[:, :, offset + n_main :]], dim=2,
    )
    if layer.kv_start is not None:
        start_main = (layer.kv_start.to(victims.device) - offset).clamp(min=0)
        evicted_pad = (victims[:, 0] < start_main[:, None]).sum(dim=1)
        layer.set_kv_start(layer.kv_start - evicted_pad.to(layer.kv_start.device))
    layer._refresh_views()


def _complement(victims: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted indices in [0, n) not in victims (B, H, E): (B, H, n - E)."""
    drop = torch.zeros(*victims.shape[:2], n, dtype=torch.bool, device=victims.device)
    drop.scatter_(2, victims, True)
    order = torch.argsort(drop.to(torch.int8), dim=2, stable=True)
    return order[:, :, : n - victims.shape[2]]
