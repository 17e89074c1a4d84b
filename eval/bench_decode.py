"""End-to-end decode throughput and peak memory of `model.generate` on a Llama-3-8B-shaped model (random bf16
weights, nothing downloaded): DynamicCache vs KVPressCache(int8-int4) vs transformers' QuantizedCache (quanto int4).

    python eval/bench_decode.py --contexts 8192 32768 --batches 1 8 --new-tokens 32
    python eval/bench_decode.py --contexts 32768 --batches 8 --profile   # + GPU busy time per step

The H100 rows measured so far (eval/results/decode_e2e_h100_*.json) spend about 100 ms per step whatever the
cache, batch and context, far more than the bytes read need: `--profile` tells whether that time is the GPU's.

Writes eval/results/decode_e2e.json and a PNG (tokens/s per configuration). CUDA only.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kvpress
from kvpress.hf_compat import cache_kwargs


def llama3_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False)


def make_cache(name: str, model):
    if name == "dynamic":
        return None
    if name.startswith("kvpress"):
        return kvpress.KVPressCache(model.config, quant=name.split(":", 1)[1])
    if name == "quanto-int4":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    raise ValueError(f"unknown cache {name}")


def kernel_time_us(prof) -> float:
    """Total time of the GPU kernels a torch.profiler run recorded (one stream: they do not overlap)."""
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total += event.time_range.elapsed_us()
    return total


def run_one(model, name: str, batch: int, context: int, new_tokens: int, prefill_chunk: int | None = None,
            profile: bool = False) -> dict:
    """Prefill + `new_tokens` greedy steps; decode time excludes the prefill forward. With `profile`, the decode
    steps also run under torch.profiler (CUDA activity only) and the row gets `gpu_ms_per_step`, the kernels'
    busy time: far below `ms_per_step` means the step waits on the host (Python, launches), not on the GPU."""
    kvpress.unwrap(model)
    if name.startswith("kvpress"):
        kvpress.wrap(model)
    ids = torch.randint(1000, 100000, (batch, context), device="cuda")
    cache = make_cache(name, model)
    stamps: list[float] = []
    steps = [0]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None

    def stamp(_module, args):  # times the first forward and the first single-token (decode) forward
        if not stamps or (len(stamps) == 1 and args[0].shape[-1] == 1):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if prof is not None and len(stamps) == 2:
                prof.start()
        if len(stamps) == 2 and args[0].shape[-1] == 1:
            steps[0] += 1

    hook = model.get_input_embeddings().register_forward_pre_hook(stamp)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                           max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                           eos_token_id=None, pad_token_id=0,
                           prefill_chunk_size=prefill_chunk if prefill_chunk and prefill_chunk < context else None)
        torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        hook.remove()
        if prof is not None and len(stamps) == 2:
            prof.stop()
    decode_s = end - stamps[1]  # from the first decode forward to the end
    steps = steps[0]
    row = {"cache": name, "batch": batch, "context": context, "decode_steps": steps,
           "prefill_s": stamps[1] - stamps[0], "decode_tokens_per_s": batch * steps / decode_s,
           "ms_per_step": 1000 * decode_s / steps, "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
    if prof is not None:
        row["gpu_ms_per_step"] = kernel_time_us(prof) / 1000 / steps
    if name.startswith("kvpress"):
        row["kv_gib"] = cache.stats()["nbytes"] / 2**30
        row["fp16_kv_gib"] = cache.stats()["fp16_nbytes"] / 2**30
    del cache
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["context"], r["batch"]) for r in rows if "error" not in r})
    names = sorted({r["cache"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [next((r["decode_tokens_per_s"] for r in rows if r["cache"] == name and (r["context"], r["batch"]) == s
                      and "error" not in r), 0) for s in settings]
        ax.bar([j + i * width for j in range(len(settings))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], [f"{c // 1024}k, b{b}" for c, b in settings])
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--caches", nargs="+", default=["dynamic", "kvpress:int8-int4", "quanto-int4"])
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="prefill_chunk_size for every cache (0: off)")
    parser.add_argument("--out", default="eval/results/decode_e2e.json")
    parser.add_argument("--profile", action="store_true",
                        help="also record the GPU kernels' busy time per decode step (gpu_ms_per_step)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU (it times an 8B-shaped model in bf16).")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama3_8b_config(args.layers), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
            "model": "Llama-3-8B shape, random bf16 weights", "new_tokens": args.new_tokens,
            "command": "python eval/bench_decode.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    for name in args.caches:  # warm-up: Triton JIT compilation and allocator growth are not decode speed
        try:
            run_one(model, name, 2, 1024, 4, None)
        except Exception as err:
            print(f"warm-up of {name} failed: {err}", flush=True)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            for name in args.caches:
                try:
                    row = run_one(model, name, batch, context, args.new_tokens, args.prefill_chunk or None,
                                  profile=args.profile)
                except Exception as err:  # record OOM / missing backend instead of losing the whole sweep
                    row = {"cache": name, "batch": batch, "context": context, "error": f"{type(err).__name__}: {err}"[:300]}
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial results survive
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
