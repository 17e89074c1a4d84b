"""Accuracy vs KV bytes, the plot a person reads: one line per press across its compression ratios.

x: KV bytes held as a fraction of a 16-bit cache of the same tokens (`compression` in cache.stats()); y: accuracy
with its 95% Wilson interval over the samples (runs). Presses are told apart by colour and marker in a legend outside
the axes (no text on the points, so nothing overlaps); the full cache is a dashed horizontal line with its interval.
Used by bench_presses.py and sweep.py.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

Z_95 = 1.959964


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p over n samples (scores in [0, 1] averaged)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + Z_95**2 / n
    centre = (p + Z_95**2 / (2 * n)) / denom
    half = Z_95 * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def press_family(spec: str) -> tuple[str, float]:
    """("snapkv:budget=adaptive", 0.5) for "snapkv:0.5:budget=adaptive"; ("full", 0.0) for the full cache."""
    parts = spec.split(":")
    if len(parts) < 2:
        return spec, 0.0
    try:
        ratio = float(parts[1])
    except ValueError:
        return spec, 0.0
    return ":".join([parts[0], *parts[2:]]), ratio


def plot_accuracy_vs_bytes(rows: list[dict], path: Path, title: str, suffix=lambda row: "") -> None:
    """rows: aggregated rows with press, overall, compression and runs (bench_presses.aggregate), one panel;
    `suffix(row)` extends the line's name (e.g. " + int8-int4" when rows of several quantizations share a plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float, float, float, float]]] = defaultdict(list)
    full = []
    for row in rows:
        if "overall" not in row:
            continue
        low, high = wilson_interval(row["overall"], row["runs"])
        family, ratio = press_family(row["press"])
        point = (row["compression"], 100 * row["overall"], 100 * low, 100 * high, ratio)
        family += suffix(row)
        (full if family == "full" else lines[family]).append(point)
    fig, ax = plt.subplots(figsize=(9, 5))
    markers = "osD^vP<>Xph*"
    for i, (family, points) in enumerate(sorted(lines.items())):
        points.sort()
        xs, ys, lows, highs, _ = zip(*points)
        ax.errorbar(xs, ys, yerr=([y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]),
                    color=plt.cm.tab20(i % 20), marker=markers[i % len(markers)], capsize=3, lw=1.5, label=family)
    for x, y, low, high, _ in full:
        ax.axhline(y, color="black", ls="--", lw=1, label=f"full cache ({x:.2f}x of fp16)")
        ax.axhspan(low, high, color="black", alpha=0.06)
    ax.set(xlabel="KV bytes held / bytes of a 16-bit cache of the same tokens", ylabel="accuracy % (95% interval)",
           ylim=(-3, 103), title=title)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
