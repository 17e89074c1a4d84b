"""CPU cost of compression on the default model: prefill seconds and decode ms/step per cache configuration.

One run, rows interleaved: each round prefills every config in turn, keeps all their caches, then runs the decode
steps one config after another, step by step, so that a slow spell of the (shared) machine hits every config alike;
a round's decode figure is the median step, and a config's figure is its best round. The first decode step is
reported apart: a press compresses the prompt there.

    python eval/bench_cpu.py                      # 3k-token prompt, 2 threads, 2 rounds -> eval/results/bench_cpu.json
    python eval/bench_cpu.py --tokens 1024 --steps 8 --rounds 1 --configs full int8-int4   # quick look
    python eval/bench_cpu.py --prefill-chunks 0 1024 512 --threads 1 --cpu-time --steps 2 \
        --json eval/results/bench_cpu_prefill_chunks.json   # prefill chunking, robust on a shared machine
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import kvpress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import hf_memory, prose_token_ids  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"press": None, "quant": None},
    "int8-int4": {"press": None, "quant": "int8-int4"},
    "int4": {"press": None, "quant": "int4"},
    "int4-int2": {"press": None, "quant": "int4-int2"},  # issue 16's low-bit layouts (int2-int2: keys per channel)
    "int2-int2": {"press": None, "quant": "int2-int2"},
    "snapkv:0.5": {"press": "snapkv:0.5", "quant": None},
    "snapkv:0.5 + int8-int4": {"press": "snapkv:0.5", "quant": "int8-int4"},
    "h2o:0.5": {"press": "h2o:0.5", "quant": None},
    "DynamicCache": {"hf": "dynamic"},
    "QuantizedCache quanto int4": {"hf": "quanto"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3072, help="prompt tokens (default 3072)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed after the first (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prefill in chunks of this many tokens (default: the whole prompt in one forward)")
    parser.add_argument("--prefill-chunks", type=int, nargs="+", default=None, metavar="N",
                        help="one row per config and chunk size (0: the whole prompt), interleaved")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the thread's CPU time (needs --threads 1): robust to other processes")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                        help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--model", default="default")
    parser.add_argument("--json", type=Path, default=Path("eval/results/bench_cpu.json"))
    return parser.parse_args(argv)


def cache_keyword(model) -> str:
    """The forward's name for the cache argument: `cache` on transformers >= 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_cache(spec: dict[str, Any], model):
    """A fresh cache for one configuration."""
    if spec.get("hf") == "dynamic":
        return transformers.DynamicCache(config=model.config)
    if spec.get("hf") == "quanto":
        return transformers.QuantizedCache(backend="quanto", config=model.config, nbits=4)
    return kvpress.KVPressCache(model.config, press=spec["press"], quant=spec["quant"])


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, spec: dict[str, Any], chunk: int | None, clock=time.perf_counter) -> dict:
    """A fresh cache for `spec`, the prompt prefilled (in chunks of `chunk`) and one first decode step (where a press
    compresses): the live state of one row of a round, with those two timings."""
    cache = make_cache(spec, model)
    key = cache_keyword(model)
    start = clock()
    size = chunk or ids.shape[1]
    for lo in range(0, ids.shape[1], size):
        out = model(input_ids=ids[:, lo : lo + size], use_cache=True, logits_to_keep=1, **{key: cache})
    prefill_s = clock() - start
    start = clock()
    out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{key: cache})
    return {"cache": cache, "key": key, "logits": out.logits, "prefill_s": prefill_s,
            "first_step_ms": 1000 * (clock() - start), "steps_ms": []}


@torch.inference_mode()
def decode_step(model, state: dict, clock=time.perf_counter) -> None:
    """One timed greedy decode step of a row's live state."""
    token = state["logits"][:, -1:].argmax(-1)
    start = clock()
    state["logits"] = model(input_ids=token, use_cache=True, **{state["key"]: state["cache"]}).logits
    state["steps_ms"].append(1000 * (clock() - start))


def run_round(model, ids: torch.Tensor, rows_of: list[tuple[str, str, int | None]], steps: int,
              clock=time.perf_counter) -> dict[str, dict[str, Any]]:
    """Every row prefilled in turn, then `steps` decode steps interleaved across the rows (one step of each row,
    again and again), so that a slow spell of a shared machine hits every row alike; the median step per row."""
    states = {row: prefill(model, ids, CONFIGS[name], chunk, clock) for row, name, chunk in rows_of}
    for _ in range(steps):
        for state in states.values():
            decode_step(model, state, clock)
    runs = {}
    for row, state in states.items():
        cache = state["cache"]
        nbytes = (cache.stats()["nbytes"] if isinstance(cache, kvpress.KVPressCache)
                  else hf_memory(cache, model.config)["nbytes"])
        runs[row] = {"prefill_s": state["prefill_s"], "first_step_ms": state["first_step_ms"],
                     "decode_ms_per_step": statistics.median(state["steps_ms"]), "nbytes": nbytes}
    return runs


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the best (lowest) over rounds."""
    return {name: min(run[name] for run in runs) for name in runs[0]}


def markdown(rows: dict[str, dict[str, Any]], reference: str = "full") -> str:
    """The README table: absolute figures and ratios to the full cache."""
    ref = rows.get(reference)
    lines = ["| config | prefill s | x full | first decode step ms | decode ms/step | x full | KV MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        prefill_x = f"{r['prefill_s'] / ref['prefill_s']:.2f}" if ref else "-"
        decode_x = f"{r['decode_ms_per_step'] / ref['decode_ms_per_step']:.2f}" if ref else "-"
        lines.append(f"| {name} | {r['prefill_s']:.2f} | {prefill_x} | {r['first_step_ms']:.0f} | "
                     f"{r['decode_ms_per_step']:.1f} | {decode_x} | {r['nbytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread's CPU time: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    model, tok = kvpress.load_default_model() if args.model == "default" else kvpress.default_model.load_model(
        args.model)
    kvpress.wrap(model)  # HF caches fall back to SDPA inside the kvpress attention (no KVPressCache in use)
    ids = prose_token_ids(tok, 0, args.tokens)
    chunks = args.prefill_chunks or [args.prefill_chunk or 0]
    rows_of = [(name if args.prefill_chunks is None else f"{name} @ chunk {chunk or 'whole'}", name, chunk or None)
               for name in args.configs for chunk in chunks]
    run_round(model, ids[:, :256], rows_of, 2)  # warm-up (one-off costs such as quanto's kernel build), not recorded
    runs: dict[str, list] = {row: [] for row, _, _ in rows_of}
    for round_index in range(args.rounds):
        for row, run in run_round(model, ids, rows_of, args.steps, clock).items():
            runs[row].append(run)
            print(f"round {round_index + 1} {row:36s} prefill {run['prefill_s']:6.2f} s  first step "
                  f"{run['first_step_ms']:7.1f} ms  decode {run['decode_ms_per_step']:7.1f} ms/step", flush=True)
    rows = {name: best(r) for name, r in runs.items()}
    table = markdown(rows, reference="full" if "full" in rows else next(iter(rows)))
    print(table)
    report = {
        "command": "python eval/bench_cpu.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
                "clock": "thread CPU time" if args.cpu_time else "wall (perf_counter)",
                "cpu": platform.processor() or platform.machine(), "device": "cpu"},
        "tokens": args.tokens, "steps": args.steps, "rounds": args.rounds, "prefill_chunk": args.prefill_chunk,
        "prefill_chunks": args.prefill_chunks,
        "rows": rows, "runs": runs, "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
