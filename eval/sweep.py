"""The evaluation sweep users want: every press x compression ratio x quantization on the default model, accuracy
on the offline long-context tasks against KV bytes (the Pareto view).

    python eval/sweep.py --ratios 0.5 0.75 0.9 --quants none int8-int4 --lengths 2048 --n 20

Runs eval/bench_presses.py once per quantization setting (progress bar, resumable), then writes
eval/results/sweep.json (all aggregated rows) and eval/results/sweep.png (accuracy vs KV bytes, one line per press across its ratios, 95% intervals).
Ratio 0 is the full cache ("full").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_presses  # noqa: E402
from press_plot import plot_accuracy_vs_bytes  # noqa: E402

PRESS_NAMES = ["snapkv", "h2o", "streaming", "knorm", "random"]


def press_grid(names: list[str], ratios: list[float]) -> list[str]:
    return ["full"] + [f"{name}:{ratio:g}" for name in names for ratio in ratios if ratio > 0]


def plot(rows: list[dict], path: Path) -> None:
    """One line per press (and quantization) across its ratios: accuracy vs bytes over a 16-bit cache (press_plot)."""
    plot_accuracy_vs_bytes(rows, path, "kvpress sweep: accuracy vs KV bytes",
                           suffix=lambda row: f" + {row['quant']}" if row.get("quant") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presses", nargs="+", default=PRESS_NAMES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--quants", nargs="+", default=["none", "int8-int4"])
    parser.add_argument("--lengths", nargs="+", default=["2048"])
    parser.add_argument("--n", default="20")  # at least 20 samples per point: 10-point differences visible
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue"])
    parser.add_argument("--threads", default="2")
    parser.add_argument("--out-dir", default="eval/results")
    args = parser.parse_args(argv)
    rows = []
    for quant in args.quants:
        tag = f"sweep_{quant.replace(':', '_')}"
        common = ["--lengths", *args.lengths, "--n", args.n, "--tasks", *args.tasks, "--threads", args.threads,
                  "--presses", *press_grid(args.presses, args.ratios), "--tag", tag, "--out-dir", args.out_dir,
                  "--resume", "--no-plot"]
        if quant != "none":
            common += ["--quant", quant]
        bench_presses.main(common)
        data = json.loads((Path(args.out_dir) / f"presses_{tag}.json").read_text())
        rows += [{**row, "quant": None if quant == "none" else quant} for row in data["aggregate"]]
    out = Path(args.out_dir) / "sweep.json"
    command = "python eval/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"{len(rows)} configurations -> {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
