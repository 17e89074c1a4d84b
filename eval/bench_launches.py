"""Per-step launch overhead, measured on CPU: what one decode step dispatches, per layer, for a tiny random Llama.

A proxy for the GPU launch overhead of batch-1 decode (no GPU needed, nothing downloaded). For every decode step:
  (a) torch ops dispatched OUTSIDE the kernel entry points (TorchDispatchMode), split into compute ops (each one
      GPU kernel launch, roughly), views, allocations and host syncs (.item()/bool(): no launch, but a stall);
  (b) calls of the kernel entry points (kvpress.kernels: decode_attention_multi, extend_attention_multi,
      add_score_mass, merge_attention_states, quantize_store; older trees also decode_attention, extend_attention,
      attention_scores), whose inner ops are not counted in
      (a);
  (c) estimated GPU launches = compute ops of (a) + launches per entry point: Triton attention 1 kernel + 1 combine
      when it splits (split counts as the Triton path picks them on an H100, 132 SMs), attention_scores 1,
      add_score_mass 1, quantize_store 1, merge_attention_states 1 (it is a torch function: `launches_merge_as_torch` counts its real
      torch ops instead).
Counts are per layer (the layer's attention function and cache update), averaged over the measured steps (window
flushes included), plus the whole model's forward per step. The kernels run as their torch twins on CPU, which
does not change what is dispatched outside them. Variants: transformers' DynamicCache (plain model, SDPA),
kvpress unquantized, kvpress int8-int4 with the per-segment decode (KVPRESS_DECODE=segments) and with the fused
one (decode_attention_multi), optionally with an H2O press.

    python eval/bench_launches.py                 # writes eval/results/launches.json, prints a table
    # the per-segment decode as it was before the fused kernel (an export of that commit's package):
    git archive ee86933 kvpress | tar -x -C /tmp/kvpress_before
    python eval/bench_launches.py --kvpress-src /tmp/kvpress_before --variants int8-int4-segments \
        int8-int4-h2o-segments --label "ee86933, before" --append
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path


def _early_kvpress_src(argv: list[str]) -> str | None:
    """--kvpress-src DIR must take effect before kvpress is imported (it measures another source tree)."""
    for i, arg in enumerate(argv):
        if arg == "--kvpress-src" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--kvpress-src="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__" and _early_kvpress_src(sys.argv[1:]):
    sys.path.insert(0, str(Path(_early_kvpress_src(sys.argv[1:])).resolve()))
os.environ["KVPRESS_KERNELS"] = "reference"  # CPU: the twins (what they dispatch is not counted); read at import

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kvpress
import kvpress.attention
import kvpress.segments
from kvpress.cache import KVPressLayer
from bench_host import cache_kw  # the forward's cache keyword on this tree's transformers (and older trees)

RESULTS = Path(__file__).resolve().parent / "results" / "launches.json"
H100_TARGET_PROGRAMS = 8 * 132  # what the Triton launchers aim for on an H100 SXM (kernels.decode._target_programs)
ALLOC_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero"}
# (module, attribute) of every kernel entry point as the library calls it (the kvpress.segments ones exist in trees
# from before issue 12 only)
ENTRY_POINTS = [
    (kvpress.segments, "decode_attention"),
    (kvpress.segments, "extend_attention"),
    (kvpress.segments, "attention_scores"),
    (kvpress.segments, "quantize_store"),
    (kvpress.attention, "decode_attention_multi"),
    (kvpress.attention, "extend_attention_multi"),
    (kvpress.attention, "merge_attention_states"),
    (kvpress.attention, "add_score_mass"),  # trees before issue 12; then H2O's state calls it
    (sys.modules.get("kvpress.presses.h2o"), "add_score_mass"),
]


def tiny_llama(dtype: torch.dtype, seed: int = 0):
    """Random tiny Llama (2 layers, GQA 4:1, head_dim 64: the Triton kernels' shapes), as tests/tiny_models.py."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         pad_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def _splits(q_heads: int, batch: int, kv_heads: int, head_dim: int, capacities: list[int], queries: int = 1) -> int:
    """Total splits the Triton launchers would pick on an H100 for one store (store_attention_triton) or several
    (kernels.multi.multi_split_counts); restated here so that older source trees (--kvpress-src) can be measured."""
    rows = q_heads // kv_heads * queries
    block_m = max(16, min(64, 1 << max(0, rows - 1).bit_length()))
    block_n = 64 if block_m > 16 and head_dim <= 128 else 32
    programs = batch * kv_heads * -(-rows // block_m)
    wanted = -(-H100_TARGET_PROGRAMS // programs)
    total = max(1, sum(capacities))
    counts = [max(1, min(-(-cap // (4 * block_n)), round(wanted * cap / total), 64)) for cap in capacities]
    return min(sum(counts), max(64, len(counts)))


def entry_launches(name: str, args: tuple) -> int:
    """Estimated GPU launches of one entry-point call on the Triton path (see the module docstring)."""
    if name in ("decode_attention", "extend_attention"):
        q, k, table = args[0], args[1], args[7]
        queries = 1 if name == "decode_attention" else q.shape[2]
        splits = _splits(q.shape[1], q.shape[0], k.shape[1], q.shape[-1], [table.shape[1] * k.shape[2]], queries)
        return 1 + (splits > 1)
    if name in ("decode_attention_multi", "extend_attention_multi"):
        q, stores = args[0], args[1]
        # KVStore (issue 12 on) or the older argument tuples
        capacities = [s.capacity if hasattr(s, "capacity") else s[6].shape[1] * s[0].shape[2] for s in stores]
        kv_heads = stores[0].k.shape[1] if hasattr(stores[0], "k") else stores[0][0].shape[1]
        queries = 1 if name == "decode_attention_multi" else q.shape[2]
        splits = _splits(q.shape[1], q.shape[0], kv_heads, q.shape[-1], capacities, queries)
        return 1 + (splits > 1)
    return 1  # attention_scores, add_score_mass, quantize_store, merge_attention_states (as one fused launch)


class Recorder(TorchDispatchMode):
    """Counts aten ops by kind and region; ops inside kernel entry points are counted apart (`inner`)."""

    def __init__(self) -> None:
        super().__init__()
        self.entry_depth = 0
        self.in_layer = 0
        self.counts: Counter = Counter()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = "view" if func.is_view else "alloc" if name in ALLOC_OPS else "sync" if name in SYNC_OPS else "compute"
        if self.entry_depth:
            if kind == "compute" and self.entry_depth == 1:
                self.counts[f"inner_compute:{self.current_entry}"] += 1
        else:
            self.counts[f"model_{kind}"] += 1
            if self.in_layer:
                self.counts[f"layer_{kind}"] += 1
                if kind == "compute":
                    self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def instrumented(recorder: Recorder):
    """Wrap the entry points, the attention functions and the cache updates so the recorder knows where it is."""
    saved = []

    def wrap_entry(module, attr):
        real = getattr(module, attr)

        def counted(*args, **kwargs):
            if recorder.entry_depth == 0:
                recorder.counts[f"entry:{attr}"] += 1
                recorder.counts["entry_launches"] += entry_launches(attr, args)
                recorder.current_entry = attr
                if recorder.in_layer:
                    recorder.counts["layer_entry_calls"] += 1
                    recorder.counts["layer_entry_launches"] += entry_launches(attr, args)
            recorder.entry_depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                recorder.entry_depth -= 1

        saved.append((module, attr, real))
        setattr(module, attr, counted)

    def wrap_layer(owner, attr):
        real = getattr(owner, attr)

        def in_layer(*args, **kwargs):
            recorder.in_layer += 1
            try:
                return real(*args, **kwargs)
            finally:
                recorder.in_layer -= 1

        saved.append((owner, attr, real))
        setattr(owner, attr, in_layer)

    for module, attr in ENTRY_POINTS:
        if hasattr(module, attr):  # older source trees lack decode_attention_multi
            wrap_entry(module, attr)
    wrap_layer(DynamicLayer, "update")
    wrap_layer(KVPressLayer, "update")
    functions = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", kvpress.attention.ATTENTION_NAME)}
    for name, real in functions.items():
        def in_layer_attention(*args, _real=real, **kwargs):
            recorder.in_layer += 1
            try:
                return _real(*args, **kwargs)
            finally:
                recorder.in_layer -= 1

        AttentionInterface.register(name, in_layer_attention)
    try:
        yield
    finally:
        for owner, attr, real in reversed(saved):
            setattr(owner, attr, real)
        for name, real in functions.items():
            AttentionInterface.register(name, real)


def measure(variant: dict, prompt_len: int, steps: int, batch: int, pads: list[int], dtype: torch.dtype) -> dict:
    """Prefill, one warm-up decode step (compression happens there), then `steps` measured decode steps."""
    os.environ["KVPRESS_DECODE"] = variant.get("decode", "fused")  # read by trees before issue 12 only
    model = tiny_llama(dtype)
    layers = model.config.num_hidden_layers
    if variant["cache"] == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        kvpress.wrap(model)
        cache = kvpress.KVPressCache(model.config, quant=variant.get("quant"), press=variant.get("press"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads[:batch]):
        mask[row, :n] = 0
    kw = cache_kw(model, cache)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
        for step in range(steps + 1):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            recorder = Recorder()
            with instrumented(recorder), recorder:
                out = model(input_ids=token, attention_mask=mask, **kw)
            if step == 0:
                totals, ops = Counter(), Counter()  # the first step compresses / evicts: not a steady step
                continue
            totals.update(recorder.counts)
            ops.update(recorder.ops)
    per_layer = lambda key: totals[key] / (steps * layers)  # noqa: E731
    inner_merge = totals["inner_compute:merge_attention_states"] / max(1, totals["entry:merge_attention_states"])
    result = {
        "name": variant["name"],
        "layer_torch_compute_ops": per_layer("layer_compute"),
        "layer_torch_views": per_layer("layer_view"),
        "layer_torch_allocs": per_layer("layer_alloc"),
        "layer_host_syncs": per_layer("layer_sync"),
        "layer_entry_calls": per_layer("layer_entry_calls"),
        "layer_entry_calls_by_name": {k.split(":", 1)[1]: v / (steps * layers) for k, v in totals.items()
                                      if k.startswith("entry:")},  # fmt: skip
        "layer_launches": per_layer("layer_compute") + per_layer("layer_entry_launches"),
        "layer_launches_merge_as_torch": per_layer("layer_compute") + per_layer("layer_entry_launches")
        + per_layer("entry:merge_attention_states") * (inner_merge - 1),
        "merge_torch_ops_per_call": inner_merge,
        "model_torch_compute_ops_per_step": totals["model_compute"] / steps,
        "model_launches_per_step": (totals["model_compute"] + totals["entry_launches"]) / steps,
        "model_host_syncs_per_step": totals["model_sync"] / steps,
        "layer_compute_ops_by_name": {k: v / (steps * layers) for k, v in ops.most_common()},
    }
    return result


H2O = "h2o:0.0:max_tokens=480,recent=32"
VARIANTS = {
    "dynamic": {"name": "DynamicCache (SDPA)", "cache": "dynamic"},
    "fp": {"name": "kvpress fp (SDPA over the store)", "cache": "kvpress"},
    "int8-int4-segments": {"name": "kvpress int8-int4, per-segment decode", "cache": "kvpress", "quant": "int8-int4",
                           "decode": "segments"},
    "int8-int4-fused": {"name": "kvpress int8-int4, fused decode", "cache": "kvpress", "quant": "int8-int4",
                        "decode": "fused"},
    "int8-int4-h2o-segments": {"name": "kvpress int8-int4 + h2o, per-segment decode", "cache": "kvpress",
                               "quant": "int8-int4", "press": H2O, "decode": "segments"},
    "int8-int4-h2o-fused": {"name": "kvpress int8-int4 + h2o, fused decode", "cache": "kvpress", "quant": "int8-int4",
                            "press": H2O, "decode": "fused"},
}  # fmt: skip


def table(rows: list[dict]) -> str:
    width = max(46, *(len(r["name"]) for r in rows))
    head = (f"{'variant':<{width}} {'torch ops':>9} {'syncs':>6} {'entries':>7} {'launches':>8} {'(merge=torch)':>13} "
            f"{'model launches/step':>19}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}} {r['layer_torch_compute_ops']:>9.2f} {r['layer_host_syncs']:>6.2f} "
            f"{r['layer_entry_calls']:>7.2f} {r['layer_launches']:>8.2f} {r['layer_launches_merge_as_torch']:>13.2f} "
            f"{r['model_launches_per_step']:>19.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default int8-int4: 4 sinks, "
                        "380 quantized, 128 in the window)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=32, help="measured decode steps (16 = one window flush)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (rows > 0 left-padded)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=[key for key, v in VARIANTS.items() if v.get("decode") != "segments"],
                        help="the *-segments variants need a tree from before issue 12 (--kvpress-src)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--kvpress-src", default=None, help="measure the kvpress package found in this directory "
                        "(e.g. an export of an older commit: git archive HEAD kvpress | tar -x -C DIR)")
    parser.add_argument("--label", default=None, help="suffix of the variant names (e.g. the commit measured)")
    parser.add_argument("--append", action="store_true", help="add the rows and the command to an existing --out")
    args = parser.parse_args(argv)
    saved_mode = os.environ.get("KVPRESS_DECODE")
    results = []
    try:
        for batch in args.batches:
            pads = [0] + [8 * i for i in range(1, batch)]
            rows = []
            for key in args.variants:
                row = measure(VARIANTS[key], args.prompt, args.steps, batch, pads, getattr(torch, args.dtype))
                row.update(variant=key, batch=batch, source=args.kvpress_src or "working tree")
                if args.label:
                    row["name"] += f" [{args.label}]"
                rows.append(row)
            print(f"\nbatch {batch} (left padding {pads}), {args.dtype}, prompt {args.prompt}, per layer and decode "
                  f"step, averaged over {args.steps} steps:")
            print(table(rows))
            results += rows
    finally:
        if saved_mode is None:
            os.environ.pop("KVPRESS_DECODE", None)
        else:
            os.environ["KVPRESS_DECODE"] = saved_mode
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "eval/bench_launches.py", *(argv if argv is not None else sys.argv[1:])])
    payload = {
        "commands": [command],
        "what": "per layer and decode step: torch compute ops outside the kernel entry points, host syncs, entry "
                "calls, estimated GPU launches (compute ops + Triton launches per entry, merge counted as 1; "
                "'merge_as_torch' counts merge_attention_states' real torch ops); CPU-measured, no GPU timings",
        "model": f"random tiny Llama ({args.dtype}): 2 layers, 8 query heads, 2 kv heads, head_dim 64",
        "prompt": args.prompt,
        "steps": args.steps,
        "torch": torch.__version__,
        "results": [],
    }
    if args.append and args.out.exists():
        payload = json.loads(args.out.read_text())
        payload["commands"].append(command)
    payload["results"] += results
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.append:
        for batch in sorted({r["batch"] for r in payload["results"]}):
            print(f"\nall rows of {args.out.name}, batch {batch}:")
            print(table([r for r in payload["results"] if r["batch"] == batch]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
