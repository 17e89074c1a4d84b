"""Per-layer budget schedules: how one total of kept tokens is shared out over a model's pressed layers.

`uniform`: every layer keeps the same budget. `pyramid` (PyramidKV, Cai et al. 2024): the compressible part of the
total (what is not forced sinks + recent) decreases linearly with depth, from about 2x the uniform share at the first
layer to 1/beta of it at the last, so lower layers (broad attention) keep more and upper layers (focused attention)
keep less, for the same total. Pure integer arithmetic on Python ints.
"""
from __future__ import annotations

LAYER_SCHEDULES = ("uniform", "pyramid")
PYRAMID_BETA = 20  # PyramidKV's default: the last layer keeps 1/beta of the uniform (compressible) share


def pyramid_weights(n_layers: int, beta: int = PYRAMID_BETA) -> list[float]:
    """Linearly decreasing weights, mean 1: layer 0 gets 2 - 1/beta, the last layer 1/beta."""
    if n_layers == 1:
        return [1.0]
    low = 1.0 / beta
    high = 2.0 - low
    step = (high - low) / (n_layers - 1)
    return [high - i * step for i in range(n_layers)]


def pyramid_shares(total: int, n_layers: int, cap: int) -> list[int]:
    """Integers, one per layer, summing to min(total, n_layers * cap), each in [0, cap], following pyramid_weights:
    layers whose share would pass `cap` are capped and the excess goes to the others in proportion to their weights
    (water-filling); fractions are rounded by largest remainder (ties to the lower layer)."""
    total = min(total, n_layers * cap)
    weights = pyramid_weights(n_layers)
    capped: set[int] = set()
    shares = [0.0] * n_layers
    while True:
        free = [i for i in range(n_layers) if i not in capped]
        rest = total - cap * len(capped)
        scale = rest / sum(weights[i] for i in free) if free else 0.0
        over = [i for i in free if weights[i] * scale > cap]
        if not over:
            for i in free:
                shares[i] = weights[i] * scale
            for i in capped:
                shares[i] = float(cap)
            break
        capped.update(over)
    floors = [min(int(s), cap) for s in shares]
    missing = total - sum(floors)
    order = sorted(range(n_layers), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in order:
        if missing <= 0:
            break
        if floors[i] < cap:
            floors[i] += 1
            missing -= 1
    return floors
