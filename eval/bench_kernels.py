"""Benchmark the fused decode kernel: time per call and achieved bandwidth (bytes the kernel must read / time)
against the device's peak, beside fp16 torch SDPA decode over the dequantized cache. CUDA only.

Series per config: `triton_int8k_int4v` (contiguous store), `triton_int8k_int4v_paged` (page size 16, shuffled
pool), `triton_fp16` (unquantized store), `sdpa_fp16` (torch SDPA with enable_gqa over a (B, Hkv, T, D) cache),
`quanto_int4` (one layer of transformers' QuantizedCache with optimum-quanto int4 in a decode step: append the
token, dequantize the whole cache, SDPA over it; eager and synchronised, so `speedup_vs_quanto` compares it with
the int8-K/int4-V kernel's `eager_us`; `--no-quanto` skips it). Kernel times come from CUDA-graph replays over
enough store copies to defeat the L2 cache; `eager_us` is one plain Python call (launch and argument checks
included). Writes eval/results/kernels_<tag>.json (+ .png).

Rows keep a "dequant" field ("registers", the kernel's one dequantization; older results also hold the removed
"factored" variant); the fp16 series (unquantized, same kernel either way) and SDPA are timed once per config and copied into each row.

    python eval/bench_kernels.py --quick
    python eval/bench_kernels.py --tune      # sweep split counts on a few configs
"""
import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpress.kernels import KVStore
from kvpress.kernels.multi import decode_attention_multi_triton

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_FLUSH_BYTES = 256 << 20  # rotate store copies until one pass reads at least this much


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick shrinks the grid to a few configs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid (a minute)")
    parser.add_argument("--tune", action="store_true", help="sweep block_n / splits / warps / stages instead")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--gqa", type=int, nargs="+", default=[4, 8], help="query heads per kv head")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=32, help="quantization group size of keys and values")
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="peak memory bandwidth (H100 SXM: 3350)")
    parser.add_argument("--max-cache-gib", type=float, default=24.0, help="skip configs whose fp16 cache is larger")
    parser.add_argument("--iters", type=int, default=20, help="graph replays per measurement")
    parser.add_argument("--tag", default=None, help="output name suffix (default: quick/full/tune)")
    parser.add_argument("--no-quanto", action="store_true",
                        help="skip the transformers QuantizedCache (quanto int4) decode-step series")
    parser.add_argument("--quanto-steps", type=int, default=40, help="timed QuantizedCache decode steps per config")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of an existing results JSON")
    args = parser.parse_args(argv)
    if args.quick and not args.tune:
        args.contexts, args.batches, args.head_dims, args.gqa = [1024, 8192, 32768], [1, 8], [128], [4, 8]
    for name in ("contexts", "batches", "head_dims", "gqa"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} values must be positive")
    args.dequant = ["registers"]  # the one dequantization left (rows keep the field, as in older results)
    return args


def make_stores(batch: int, kv_heads: int, tokens: int, head_dim: int, group: int, copies: int, paged: bool):
    """`copies` int8-key / int4-value stores (contiguous, or paged with S=16 and a shuffled pool) + kernel args."""
    page_size = 16 if paged else tokens
    pages_per_row = math.ceil(tokens / page_size)
    pool = batch * pages_per_row
    dev = "cuda"
    stores = []
    for _ in range(copies):
        shape = (pool, kv_heads, page_size)
        k = torch.randint(0, 256, (*shape, head_dim), dtype=torch.uint8, device=dev)
        v = torch.randint(0, 256, (*shape, head_dim // 2), dtype=torch.uint8, device=dev)
        scales = [torch.rand(*shape, head_dim // group, device=dev, dtype=torch.float16) * 0.02 for _ in range(4)]
        if paged:
            table = torch.randperm(pool, device=dev).to(torch.int32).view(batch, pages_per_row)
        else:
            table = torch.arange(batch, device=dev, dtype=torch.int32)[:, None]
        stores.append((k, v, *scales, table))
    return stores


def quant_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, group: int, q_heads: int) -> int:
    """Bytes a decode call must move: int8 keys, packed int4 values, fp16 scale+zero of both, q in, out+lse out."""
    per_token = head_dim + head_dim // 2 + 2 * 2 * 2 * (head_dim // group)
    return batch * kv_heads * tokens * per_token + batch * q_heads * (head_dim * 2 + head_dim * 4 + 4)


def fp16_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, q_heads: int) -> int:
    """Bytes a decode call over an fp16 cache must move (K and V once each, plus q and out)."""
    return batch * kv_heads * tokens * head_dim * 2 * 2 + batch * q_heads * head_dim * 4


def graph_time_us(calls: list, iters: int) -> float:
    """Median per-call time (us) of replaying a CUDA graph that runs every closure in `calls` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up: compile and autotune outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / len(calls))
    del graph
    return statistics.median(samples)


def eager_time_us(fn, repeats: int = 20) -> float:
    """Median wall time (us) of one synchronised eager call: what a Python decode loop pays per layer."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def quanto_layers(batch: int, kv_heads: int, tokens: int, head_dim: int, copies: int, device: str = "cuda") -> list:
    """`copies` transformers QuantizedCache layers (quanto int4, its defaults: groups of 64, residual of 128 fp
    tokens) prefilled with `tokens` random fp16 tokens, as generate leaves them after the prompt."""
    from transformers.cache_utils import QuantoQuantizedLayer

    layers = []
    for _ in range(copies):
        layer = QuantoQuantizedLayer(nbits=4)
        shape = (batch, kv_heads, tokens, head_dim)
        layer.update(torch.randn(shape, device=device, dtype=torch.float16),
                     torch.randn(shape, device=device, dtype=torch.float16))  # fmt: skip
        layers.append(layer)
    return layers


def quanto_step(layer, q4: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One layer's attention in a QuantizedCache decode step: append the new token (re-quantizing everything
    when the residual fills), get back the whole cache dequantized, then fp16 SDPA over it. Appends one token."""
    shape = (q4.shape[0], layer._quantized_keys.shape[1], 1, q4.shape[-1])
    keys, values = layer.update(torch.randn(shape, device=q4.device, dtype=q4.dtype),
                                torch.randn(shape, device=q4.device, dtype=q4.dtype))  # fmt: skip
    return F.scaled_dot_product_attention(q4, keys, values, scale=sm_scale, enable_gqa=True)


def quanto_time_us(layers: list, q4: torch.Tensor, sm_scale: float, steps: int) -> dict:
    """Per-step wall time (us, synchronised) of `steps` consecutive decode steps over each layer in turn (eager:
    the layer mutates Python state, so it cannot be graph-captured). The median is a step without re-quantization;
    the mean spreads one re-quantization every residual_length steps as generate pays it."""
    sync = torch.cuda.synchronize if q4.is_cuda else (lambda: None)
    quanto_step(layers[0], q4, sm_scale)  # warm-up
    sync()
    samples = []
    for i in range(steps):
        t0 = time.perf_counter()
        quanto_step(layers[i % len(layers)], q4, sm_scale)
        sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"us": statistics.median(samples), "mean_us": statistics.fmean(samples), "steps": steps}


def quant_calls(stores, q, kv_start, kv_end, sm_scale, group, dequant="registers", **tuning):
    """Closures running the int8-K/int4-V decode kernel once per store copy (tuning: num_splits, optional)."""
    splits = tuning.get("num_splits")
    kernel_stores = [KVStore(k=s[0], v=s[1], k_scale=s[2], k_zero=s[3], v_scale=s[4], v_zero=s[5], block_table=s[6],
                             kv_start=kv_start, kv_end=kv_end, k_bits=8, v_bits=4, k_group=group, v_group=group)
                     for s in stores]  # fmt: skip
    return [lambda s=s: decode_attention_multi_triton(q, (s,), sm_scale, num_splits=None if splits is None else
                                                      (splits,)) for s in kernel_stores]  # fmt: skip


def bench_config(args, batch: int, tokens: int, head_dim: int, gqa: int) -> list[dict]:
    """Time all series for one (batch, context, head_dim, GQA) config: one row per --dequant variant."""
    kv_heads, q_heads = args.kv_heads, args.kv_heads * gqa
    sm_scale = 1.0 / math.sqrt(head_dim)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.float16)
    kv_start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    kv_end = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
    qbytes = quant_bytes(batch, kv_heads, tokens, head_dim, args.group, q_heads)
    fbytes = fp16_bytes(batch, kv_heads, tokens, head_dim, q_heads)
    base = {"batch": batch, "context": tokens, "head_dim": head_dim, "q_heads": q_heads, "kv_heads": kv_heads,
            "quant_bytes": qbytes, "fp16_bytes": fbytes}  # fmt: skip
    rows = [{**base, "dequant": name} for name in args.dequant]

    for paged in (False, True):
        copies = max(1, min(32, math.ceil(L2_FLUSH_BYTES / qbytes)))
        stores = make_stores(batch, kv_heads, tokens, head_dim, args.group, copies, paged)
        name = "triton_int8k_int4v_paged" if paged else "triton_int8k_int4v"
        for row in rows:  # variants back to back on the same stores
            calls = quant_calls(stores, q, kv_start, kv_end, sm_scale, args.group, dequant=row["dequant"])
            us = graph_time_us(calls, args.iters)
            row[name] = {"us": us, "gbps": qbytes / us / 1e3, "eager_us": eager_time_us(calls[0])}
            del calls
        del stores

    copies = max(1, min(32, math.ceil(L2_FLUSH_BYTES / fbytes)))
    caches = [(torch.randn(batch, kv_heads, tokens, head_dim, device="cuda", dtype=torch.float16),
               torch.randn(batch, kv_heads, tokens, head_dim, device="cuda", dtype=torch.float16))
              for _ in range(copies)]  # fmt: skip
    table = torch.arange(batch, device="cuda", dtype=torch.int32)[:, None]
    fp16_stores = [KVStore(k=c[0], v=c[1], block_table=table, kv_start=kv_start, kv_end=kv_end) for c in caches]
    fp16_calls = [lambda s=s: decode_attention_multi_triton(q, (s,), sm_scale) for s in fp16_stores]
    us = graph_time_us(fp16_calls, args.iters)
    fp16 = {"us": us, "gbps": fbytes / us / 1e3, "eager_us": eager_time_us(fp16_calls[0])}
    q4 = q.unsqueeze(2)
    sdpa_calls = [lambda c=c: F.scaled_dot_product_attention(q4, c[0], c[1], scale=sm_scale, enable_gqa=True)
                  for c in caches]  # fmt: skip
    us = graph_time_us(sdpa_calls, args.iters)
    sdpa = {"us": us, "gbps": fbytes / us / 1e3, "eager_us": eager_time_us(sdpa_calls[0])}
    del caches
    quanto = None
    if not args.no_quanto:
        try:
            layers = quanto_layers(batch, kv_heads, tokens, head_dim, min(4, math.ceil(L2_FLUSH_BYTES / fbytes)))
        except ImportError as err:  # optimum-quanto missing: say so once and time the rest
            print(f"skipping the QuantizedCache series: {err}", flush=True)
            args.no_quanto = True
        else:
            quanto = quanto_time_us(layers, q4, sm_scale, args.quanto_steps)
            del layers
    for row in rows:
        row["triton_fp16"], row["sdpa_fp16"] = dict(fp16), dict(sdpa)
        if quanto is not None:
            row["quanto_int4"] = dict(quanto)
            row["speedup_vs_quanto"] = quanto["us"] / row["triton_int8k_int4v"]["eager_us"]
        row["speedup_vs_sdpa"] = sdpa["us"] / row["triton_int8k_int4v"]["us"]
    return rows


def tune(args) -> list[dict]:
    """Sweep the split count on representative configs (tiles, warps and stages are the launcher's); print the
    best of each."""
    results = []
    configs = [(1, 32768, 128, 4), (8, 8192, 128, 8), (32, 4096, 128, 4), (4, 131072, 64, 8), (32, 32768, 128, 8)]
    sweep = (1, 2, 4, 8)
    if args.quick:
        configs, sweep = [configs[1], configs[4]], (4, 8)
    for batch, tokens, head_dim, gqa in configs:
        kv_heads = args.kv_heads
        q = torch.randn(batch, kv_heads * gqa, head_dim, device="cuda", dtype=torch.float16)
        kv_start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        kv_end = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
        qbytes = quant_bytes(batch, kv_heads, tokens, head_dim, args.group, kv_heads * gqa)
        stores = make_stores(batch, kv_heads, tokens, head_dim, args.group,
                             max(1, min(16, math.ceil(L2_FLUSH_BYTES / qbytes))), paged=False)  # fmt: skip
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for dequant in args.dequant:
            rows = []
            for per_sm in sweep:
                splits = max(1, min(64, math.ceil(per_sm * sms / (batch * kv_heads)), math.ceil(tokens / 32)))
                tuning = dict(num_splits=splits)
                calls = quant_calls(stores, q, kv_start, kv_end, 1.0, args.group, dequant=dequant, **tuning)
                try:
                    us = graph_time_us(calls, 10)
                except Exception as exc:  # resource limits for some combos: record and move on
                    rows.append({**tuning, "error": type(exc).__name__})
                    continue
                rows.append({**tuning, "per_sm": per_sm, "us": us, "gbps": qbytes / us / 1e3})
            default_us = graph_time_us(quant_calls(stores, q, kv_start, kv_end, 1.0, args.group, dequant=dequant), 10)
            ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            best = ok[0] if ok else None
            print(f"tune {dequant} B={batch} T={tokens} D={head_dim} gqa={gqa}: default {default_us:.1f}us "
                  f"({qbytes / default_us / 1e3:.0f} GB/s); best {best}", flush=True)  # fmt: skip
            results.append({"batch": batch, "context": tokens, "head_dim": head_dim, "gqa": gqa, "dequant": dequant,
                            "default_us": default_us, "top5": ok[:5]})  # fmt: skip
        del stores
    return results


def plot(rows: list[dict], peak: float, path: Path) -> bool:
    """Achieved GB/s and speedup over SDPA vs context, one column per (head_dim, GQA); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    combos = sorted({(r["head_dim"], r["q_heads"] // r["kv_heads"]) for r in rows})
    fig, axes = plt.subplots(2, len(combos), figsize=(5 * len(combos), 8), squeeze=False)
    for col, (head_dim, gqa) in enumerate(combos):
        sel = [r for r in rows if r["head_dim"] == head_dim and r["q_heads"] // r["kv_heads"] == gqa]
        variants = list(dict.fromkeys(r.get("dequant", "registers") for r in sel))
        for batch in sorted({r["batch"] for r in sel}):
            for i, dequant in enumerate(variants):
                pts = sorted((r for r in sel if r["batch"] == batch and r.get("dequant", "registers") == dequant),
                             key=lambda r: r["context"])  # fmt: skip
                ctx = [r["context"] for r in pts]
                label = f"B={batch}" + (f" {dequant}" if len(variants) > 1 else "")
                style = dict(marker="o", ls=("-", "--", "-.")[i % 3], label=label)
                axes[0][col].plot(ctx, [r["triton_int8k_int4v"]["gbps"] for r in pts], **style)
                axes[1][col].plot(ctx, [r["speedup_vs_sdpa"] for r in pts], **style)
                if i == 0:
                    axes[0][col].plot(ctx, [r["sdpa_fp16"]["gbps"] for r in pts], ls=":", color="gray")
        axes[0][col].axhline(peak, color="red", ls="--", label="peak")
        axes[0][col].set_title(f"int8-K/int4-V decode D={head_dim} GQA {gqa}:1 (dotted: SDPA)", fontsize=10)
        axes[1][col].set_title("time speedup vs fp16 SDPA")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context tokens")
            ax.legend(fontsize=7)
        axes[0][col].set_ylabel("GB/s (bytes to read / time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the grid (or the tuning sweep) and write JSON (+ PNG) under eval/results/."""
    args = parse_args(argv)
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        return 0 if plot(data["rows"], data["meta"]["peak_gbps"], args.replot.with_suffix(".png")) else 1
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (the Triton kernels are timed with CUDA events)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("tune" if args.tune else "quick" if args.quick else "full")
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "peak_gbps": args.peak_gbps, "group": args.group,
            "dequant": args.dequant}  # fmt: skip
    if args.tune:
        out = {"meta": meta, "tune": tune(args)}
        (RESULTS_DIR / f"kernels_{tag}.json").write_text(json.dumps(out, indent=1))
        return 0
    rows = []
    json_path = RESULTS_DIR / f"kernels_{tag}.json"
    for head_dim, gqa, batch, tokens in itertools.product(args.head_dims, args.gqa, args.batches, args.contexts):
        if batch * args.kv_heads * tokens * head_dim * 4 > args.max_cache_gib * (1 << 30):
            continue
        for row in bench_config(args, batch, tokens, head_dim, gqa):
            rows.append(row)
            series = ("triton_int8k_int4v", "triton_int8k_int4v_paged", "triton_fp16", "sdpa_fp16")
            q_, p_, f_, s_ = (row[name] for name in series)
            print(f"{row['dequant']:9s} D={head_dim:3d} gqa={gqa} B={batch:2d} T={tokens:6d} | int8/int4 "
                  f"{q_['us']:8.1f}us {q_['gbps']:6.0f}GB/s ({100 * q_['gbps'] / args.peak_gbps:3.0f}%) paged "
                  f"{p_['us']:8.1f}us | fp16 triton {f_['us']:8.1f}us {f_['gbps']:5.0f}GB/s | sdpa {s_['us']:8.1f}us "
                  f"{s_['gbps']:5.0f}GB/s | x{row['speedup_vs_sdpa']:.2f}"
                  + (f" | quanto {row['quanto_int4']['us']:8.1f}us x{row['speedup_vs_quanto']:.1f} (eager)"
                     if "quanto_int4" in row else ""), flush=True)  # fmt: skip
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial results survive a kill
        torch.cuda.empty_cache()
    plotted = not args.no_plot and plot(rows, args.peak_gbps, RESULTS_DIR / f"kernels_{tag}.png")
    print(f"wrote {json_path}" + (" and .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
