"""KV quantization on the default model (CPU): quality vs the full-precision cache, bytes held, decode-step time.

Why: the issue's targets for the default spec are KL(full || int8-int4) <= 0.003 nats per decoded token and at most
half the bytes of a 16-bit DynamicCache; this measures both, beside other specs and transformers' QuantizedCache (quanto;
HQQ where installed).

Per real-prose text (pydoc haystack, different paragraph starts): prefill `--prefix` tokens in one forward, then
teacher-force the next `--cont` real tokens one at a time (the decode path) and compare every next-token
distribution with the full-precision KVPressCache run (mean KL in nats, top-1 agreement, NLL of the real tokens).
Bytes come from `cache.stats()` (tensors held, spare capacity included) and from the stored lengths (live bytes).
Also: theoretical vs measured bytes per token and kv-head for head_dim 64/128 (tiny random Llama, residual 0,
no sinks), and niah_single answers at 2k tokens with and without the default quantization.
Writes eval/results/quant.json and eval/results/quant.md.

    python eval/bench_quant.py              # full run, about 20 min on one CPU thread
    python eval/bench_quant.py --quick      # 1 text, 256 + 16 tokens, 1 needle sample: a smoke test
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import kvpress
from kvpress.eval.tasks.generator import make_tasks
from kvpress.eval.tasks.haystack import paragraph_starts, read_window
from kvpress.eval.tasks.scoring import score
from kvpress.quant import QuantSpec
from kvpress.runner import encode_prompt
from kvpress.hf_compat import cache_kwargs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "full"
DEFAULT_SPEC = "int8-int4"
# name -> quant spec for a KVPressCache on the wrapped model; None = full precision (the reference).
KVPRESS_CONFIGS: dict[str, str | None] = {
    REFERENCE: None,
    "int8-int4": "int8-int4",
    "int8-int4:r0:s0": "int8-int4:r0:s0",
    "int8-int4:gnone:r0:s0": "int8-int4:gnone:r0:s0",
    "int8": "int8",
    "int4": "int4",
}
# Low-bit layouts (issue 16): 2-bit codes, with / without the Hadamard rotation of keys, values or both.
LOW_BIT_CONFIGS = ("int4-int2", "int4-int2:rotnone", "int4-int2:rotk", "int4-int2:rotv", "int2-int2",
                   "int2-int2:rotnone", "int4:rotkv", "int8-int4:rotv", "int4-int2:r32", "int2-int2:r32",
                   "int2-int2:kcnone", "int4-int2:kc64", "int2-int2:r80", "int4-int2:kc64:r80")  # kc: keys per channel
KVPRESS_CONFIGS.update({name: name for name in LOW_BIT_CONFIGS})
# Issue 16's targets: spec -> (max bytes held / 16-bit, max KL, min top-1 agreement or None).
LOW_BIT_TARGETS = {"int4-int2": (0.25, 0.005, 0.97), "int2-int2": (0.20, 0.02, None)}
# Extra specs for `--configs` (not run by default): how much the fp window and the sinks each buy.
SWEEP_CONFIGS = ("int8-int4:r0:s4", "int8-int4:r32:s4", "int8-int4:r64:s4", "int8-int4:r128:s0")
KVPRESS_CONFIGS.update({name: name for name in SWEEP_CONFIGS})
# Caches of transformers itself, run on the unwrapped model (sdpa attention).
# transformers QuantizedCache backends at their defaults (q_group_size 64, residual 128); HQQ is not in the venv
# (`pip install hqq`, DISABLE_CUDA=1 on a CPU machine): without it its rows record the ImportError.
HF_CONFIGS = ("dynamic (sdpa)", "quanto int4", "quanto int2", "hqq int4", "hqq int2")
HF_QUANTIZED = {name: (name.split()[0], int(name[-1])) for name in HF_CONFIGS if " int" in name}  # backend, nbits
THEORY_SPECS = ("int8-int4", "int8-int4:gnone", "int8-int4:kg32", "int8", "int4", "int4:gnone")
TEXT_FRACTIONS = (0.1, 0.35, 0.6, 0.85)  # where in the list of paragraph starts each text begins


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the issue's protocol)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    parser.add_argument("--texts", type=int, default=4, help="number of prose texts (at most 4 start offsets)")
    parser.add_argument("--prefix", type=int, default=1536, help="prefix tokens, prefilled in one forward")
    parser.add_argument("--cont", type=int, default=128, help="teacher-forced continuation tokens, one per step")
    parser.add_argument("--agree-window", type=int, default=64, help="also report top-1 agreement over the first N")
    parser.add_argument("--configs", nargs="+", default=None, help=f"subset of {[*KVPRESS_CONFIGS, *HF_CONFIGS]}")
    parser.add_argument("--niah-n", type=int, default=5, help="niah_single samples (0 skips)")
    parser.add_argument("--niah-tokens", type=int, default=2048)
    parser.add_argument("--niah-new", type=int, default=32, help="max_new_tokens of each needle answer")
    parser.add_argument("--out", default="quant", help="output stem under eval/results/")
    parser.add_argument("--quick", action="store_true", help="1 text, 256 + 16 tokens, 1 needle sample")
    parser.add_argument("--replot", action="store_true", help="only redraw <out>.png from an existing <out>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.prefix, args.cont, args.niah_n, args.agree_window = 1, 256, 16, 1, 8
    if not 1 <= args.texts <= len(TEXT_FRACTIONS):
        raise ValueError(f"--texts must be between 1 and {len(TEXT_FRACTIONS)}")
    if args.prefix < 1 or args.cont < 1 or args.threads < 1:
        raise ValueError("--prefix, --cont and --threads must be positive")
    known = [*KVPRESS_CONFIGS, *HF_CONFIGS]
    args.configs = args.configs or [c for c in known if c not in SWEEP_CONFIGS]
    for name in args.configs:  # any other spec string QuantSpec parses is a kvpress config too
        if name not in known:
            try:
                QuantSpec.parse(name)
            except ValueError:
                continue
            KVPRESS_CONFIGS[name] = name
            known.append(name)
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; choose from {known}")
    if REFERENCE not in args.configs:
        args.configs = [REFERENCE, *args.configs]
    return args


# --- texts --------------------------------------------------------------------------------------------------------
def prose_token_ids(tok, start: int, n_tokens: int) -> torch.Tensor:
    """(1, n_tokens) ids of haystack prose from sentence `start`, paragraphs separated by a blank line."""
    count = 64
    while True:
        sentences = read_window(start, count)
        text = "".join(s.text + ("\n\n" if s.ends_paragraph else " ") for s in sentences)
        ids = tok(text, return_tensors="pt").input_ids
        if ids.shape[1] >= n_tokens:
            return ids[:, :n_tokens]
        count *= 2


# --- caches --------------------------------------------------------------------------------------------------------
def _tensor_bytes(t: Any) -> int:
    """Bytes of a tensor, walking tensor subclasses (optimum-quanto QTensors) down to their plain inner tensors, and
    HQQ's (codes, meta dict) pairs down to their tensors (non-tensor metadata holds no bytes)."""
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(_tensor_bytes(x) for x in t.values())
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def package_version(name: str) -> str:
    """An installed distribution's version, or "not installed" (its configs then record the ImportError)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fp16_bytes(config, tokens: int) -> int:
    """Bytes a 16-bit (fp16 or bf16) DynamicCache holds for `tokens` tokens of one sequence."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * text.num_key_value_heads * tokens * 2 * head_dim * 2


def kvpress_memory(cache: kvpress.KVPressCache) -> dict[str, Any]:
    """stats() bytes beside live bytes (stored lengths only) and one layer's per-segment length/capacity."""
    stats = cache.stats()
    live = 0
    for layer in cache.layers:
        for seg in layer.kv.segments:
            store = seg.store
            live += sum(store.view(name).numel() * store.fields[name].element_size() for name in store.fields)
    layer0 = cache.layers[0].kv
    names = ["sink", "quantized", "window"] if layer0.quant is not None else ["fp"]
    segments = {n: {"length": s.length, "capacity": s.store.capacity, "bytes": s.store.nbytes()}
                for n, s in zip(names, layer0.segments)}
    return {"tokens": stats["logical_tokens"], "nbytes": stats["nbytes"], "live_nbytes": live,
            "fp16_nbytes": stats["fp16_nbytes"], "layer0_segments": segments}


def hf_memory(cache, config) -> dict[str, Any]:
    """Bytes held by a transformers DynamicCache / QuantizedCache (quantized states + full-precision residual)."""
    total, tokens = 0, cache.get_seq_length()
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            value = getattr(layer, name, None)
            if value is not None:
                total += _tensor_bytes(value)
    return {"tokens": tokens, "nbytes": total, "live_nbytes": total, "fp16_nbytes": fp16_bytes(config, tokens)}


def make_cache(name: str, model):
    """A fresh cache for config `name` (the model must be wrapped for KVPressCache, unwrapped otherwise)."""
    if name in KVPRESS_CONFIGS:
        return kvpress.KVPressCache(model.config, quant=KVPRESS_CONFIGS[name])
    if name == "dynamic (sdpa)":
        return transformers.DynamicCache(config=model.config)
    if name in HF_QUANTIZED:
        backend, nbits = HF_QUANTIZED[name]
        return transformers.QuantizedCache(backend=backend, config=model.config, nbits=nbits)
    raise ValueError(name)


def memory(name: str, cache, model) -> dict[str, Any]:
    return kvpress_memory(cache) if name in KVPRESS_CONFIGS else hf_memory(cache, model.config)


# --- teacher-forced runs ---------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced(model, cache, ids: torch.Tensor, prefix: int, name: str) -> dict[str, Any]:
    """Prefill ids[:, :prefix], then feed the remaining tokens one by one; float32 log-probs of every decode step."""
    t0 = time.perf_counter()
    model(input_ids=ids[:, :prefix], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    after_prefill = memory(name, cache, model)
    logprobs, step_s = [], []
    for i in tqdm(range(prefix, ids.shape[1] - 1), desc=f"  {name}", leave=False, mininterval=10):
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True)
        step_s.append(time.perf_counter() - t0)
        logprobs.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
    return {"logprobs": torch.stack(logprobs), "prefill_s": prefill_s, "step_s": step_s,
            "after_prefill": after_prefill, "after_decode": memory(name, cache, model)}


def compare(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor, window: int) -> dict[str, Any]:
    """KL(ref || test) per step (nats, float64), top-1 agreement, NLL of the real next tokens under `test`."""
    ref64, test64 = ref.double(), test.double()
    kl = (ref64.exp() * (ref64 - test64)).sum(-1)
    agree = ref.argmax(-1) == test.argmax(-1)
    nll = -test64.gather(1, targets[:, None]).squeeze(1)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1_agree": agree.float().mean().item(),
            f"top1_agree_first{window}": agree[:window].float().mean().item(),
            "top1_disagreements": int((~agree).sum()), "nll": nll.mean().item(),
            "top1_acc": (test.argmax(-1) == targets).float().mean().item()}


def per_token_head(mem: dict[str, Any], config, key: str) -> float:
    text = config.get_text_config(decoder=True)
    return mem[key] / (text.num_hidden_layers * text.num_key_value_heads * mem["tokens"])


def run_texts(model, tok, args) -> tuple[list[dict], dict[str, list[dict]]]:
    """Every config on every text; metrics per (config, text) against the full-precision run of that text."""
    starts = paragraph_starts()
    texts = [starts[int(f * len(starts))] for f in TEXT_FRACTIONS[: args.texts]]
    n_tokens = args.prefix + args.cont + 1  # the last token is only a target
    order = [c for c in args.configs if c in KVPRESS_CONFIGS] + [c for c in args.configs if c in HF_CONFIGS]
    results: dict[str, list[dict]] = {c: [] for c in order}
    text_info = []
    bar = tqdm(total=len(texts) * len(order), desc="runs", mininterval=10)
    for start in texts:
        ids = prose_token_ids(tok, start, n_tokens)
        targets = ids[0, args.prefix + 1 :]
        text_info.append({"sentence_start": start, "tokens": n_tokens,
                          "opening": tok.decode(ids[0, :24]), "continuation": tok.decode(ids[0, args.prefix :][:24])})
        ref = None
        for name in order:
            wrapped = kvpress.is_wrapped(model)
            if name in KVPRESS_CONFIGS and not wrapped:
                kvpress.wrap(model)
            elif name in HF_CONFIGS and wrapped:
                kvpress.unwrap(model)
            bar.set_postfix_str(f"text {start} {name}")
            try:
                run = teacher_forced(model, make_cache(name, model), ids, args.prefix, name)
            except Exception as exc:  # a foreign backend failing on CPU is a result to record, not a crash
                if name in KVPRESS_CONFIGS:
                    raise
                results[name].append({"error": f"{type(exc).__name__}: {exc}"})
                bar.update()
                continue
            if name == REFERENCE:
                ref = run["logprobs"]
            row = compare(ref, run["logprobs"], targets, args.agree_window)
            steps = run["step_s"]
            row.update({
                "sentence_start": start, "prefill_s": run["prefill_s"],
                "decode_ms_mean": 1e3 * statistics.fmean(steps), "decode_ms_median": 1e3 * statistics.median(steps),
                "decode_ms_first": 1e3 * steps[0], "after_prefill": run["after_prefill"],
                "after_decode": run["after_decode"],
            })
            for when in ("after_prefill", "after_decode"):
                mem = row[when]
                mem["bytes_per_token_head"] = per_token_head(mem, model.config, "nbytes")
                mem["live_bytes_per_token_head"] = per_token_head(mem, model.config, "live_nbytes")
                mem["ratio_fp16"] = mem["nbytes"] / mem["fp16_nbytes"]
                mem["live_ratio_fp16"] = mem["live_nbytes"] / mem["fp16_nbytes"]
            results[name].append(row)
            bar.update()
    bar.close()
    if not kvpress.is_wrapped(model):
        kvpress.wrap(model)
    return text_info, results


def summarize(rows: list[dict], window: int) -> dict[str, Any]:
    """Means over texts (min for the top-1 agreement, the number a test threshold needs)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"error": rows[0]["error"] if rows else "not run"}
    mean = lambda key, sub=None: statistics.fmean((r[sub] if sub else r)[key] for r in ok)  # noqa: E731
    first = f"top1_agree_first{window}"
    return {
        "kl_mean": mean("kl_mean"), "kl_max": max(r["kl_max"] for r in ok), "top1_agree": mean("top1_agree"),
        "top1_agree_min_text": min(r["top1_agree"] for r in ok), first: mean(first),
        f"{first}_min_text": min(r[first] for r in ok), "nll": mean("nll"), "top1_acc": mean("top1_acc"),
        "bytes_per_token_head": mean("bytes_per_token_head", "after_decode"),
        "live_bytes_per_token_head": mean("live_bytes_per_token_head", "after_decode"),
        "ratio_fp16": mean("ratio_fp16", "after_decode"), "live_ratio_fp16": mean("live_ratio_fp16", "after_decode"),
        "prefill_ratio_fp16": mean("ratio_fp16", "after_prefill"),
        "decode_ms_mean": mean("decode_ms_mean"), "decode_ms_median": mean("decode_ms_median"),
        "prefill_s": mean("prefill_s"),
    }


def plot_kl_vs_bytes(report: dict[str, Any], path: Path) -> None:
    """KL(full || config) against the bytes held / a 16-bit cache, one labelled point per config (log KL axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, conf in report["configs"].items():
        summary = conf["summary"]
        if name == REFERENCE or "error" in summary or name == "dynamic (sdpa)":
            continue
        kl, ratio = max(summary["kl_mean"], 1e-6), summary["ratio_fp16"]
        rotated = name not in HF_CONFIGS and QuantSpec.parse(name).rotate != "none"  # 2-bit specs rotate by default
        color = "tab:red" if name in HF_CONFIGS else ("tab:green" if rotated else "tab:blue")
        ax.scatter(ratio, kl, color=color)
        ax.annotate(name, (ratio, kl), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bytes held / 16-bit DynamicCache (same tokens)")
    ax.set_ylabel("KL(full || config), nats per decoded token")
    tokens = report["settings"]["prefix"] + report["settings"]["cont"]
    ax.set_title(f"KV quantization frontier, SmolLM2-135M, ~{tokens} tokens (blue: kvpress, green: Hadamard-rotated, red: transformers QuantizedCache)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- theoretical vs measured bytes -------------------------------------------------------------------------------
@torch.no_grad()
def theory_table(tokens: int = 256) -> list[dict[str, Any]]:
    """QuantSpec.bytes_per_token_head(D) vs bytes a KVPressCache (residual 0, no sinks) holds after one forward."""
    rows = []
    for head_dim in (64, 128):
        config = transformers.LlamaConfig(
            vocab_size=512, hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=4 * tokens,
        )
        torch.manual_seed(0)
        model = kvpress.wrap(transformers.LlamaForCausalLM(config).eval())
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        for text in THEORY_SPECS:
            spec = replace(QuantSpec.parse(text), residual=0, n_sink=0)
            cache = kvpress.KVPressCache(config, quant=spec)
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            mem = kvpress_memory(cache)
            per = config.num_hidden_layers * config.num_key_value_heads * tokens
            quantized_bytes = sum(layer.kv.main.store.nbytes() for layer in cache.layers)
            rows.append({"head_dim": head_dim, "spec": str(spec), "theory": spec.bytes_per_token_head(head_dim),
                         "measured": mem["nbytes"] / per, "measured_quantized_segment": quantized_bytes / per,
                         "live": mem["live_nbytes"] / per, "fp16": 4 * head_dim,
                         "layer0_segments": mem["layer0_segments"]})
    return rows


# --- needles -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def needles(model, tok, args) -> dict[str, Any]:
    """niah_single answers with the full-precision and the default-quantized cache (greedy, same prompts)."""
    samples = make_tasks("niah_single", args.niah_n, args.niah_tokens, tokenizer=tok)
    out: dict[str, Any] = {"samples": []}
    for sample in tqdm(samples, desc="niah", mininterval=10):
        enc = encode_prompt(tok, sample["prompt"])
        row = {"index": sample["index"], "answers": sample["answers"], "prompt_tokens": enc["input_ids"].shape[1]}
        for name, quant in ((REFERENCE, None), (DEFAULT_SPEC, DEFAULT_SPEC)):
            cache = kvpress.KVPressCache(model.config, quant=quant)
            gen = model.generate(**enc, **cache_kwargs(model, cache), max_new_tokens=args.niah_new, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
            text = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            row[name] = {"prediction": text, "score": score(text, sample["answers"])}
        row["identical"] = row[REFERENCE]["prediction"] == row[DEFAULT_SPEC]["prediction"]
        out["samples"].append(row)
    for name in (REFERENCE, DEFAULT_SPEC):
        out[f"{name}_score"] = statistics.fmean(r[name]["score"] for r in out["samples"])
    out["identical"] = sum(r["identical"] for r in out["samples"])
    return out


# --- report ----------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """The tables of quant.md."""
    window = report["settings"]["agree_window"]
    first = f"top1_agree_first{window}"
    lines = [
        "# KV quantization: quality, bytes, decode time (default model, CPU)", "",
        f"Command: `{report['command']}`", "",
        f"{report['env']['model']} | torch {report['env']['torch']} | transformers {report['env']['transformers']} | "
        f"optimum-quanto {report['env']['optimum_quanto']} | hqq {report['env'].get('hqq', 'not recorded')} | "
        f"{report['env']['threads']} thread(s) | "
        f"{report['env']['cpu']} | load average at start/end "
        f"{report['env']['loadavg_start_end'][0][0]:.1f} / {report['env']['loadavg_start_end'][1][0]:.1f}", "",
        f"{len(report['texts'])} prose texts x ({report['settings']['prefix']} prefix tokens in one forward + "
        f"{report['settings']['cont']} teacher-forced decode steps). KL(full || config) in nats per decoded token, "
        f"averaged over steps then texts; top-1 = argmax agreement with the full-precision cache (mean over texts, "
        f"and the worst text over the first {window} steps); NLL of the real next tokens. Bytes per token per kv-head "
        "after decoding, from `cache.stats()['nbytes']` (all tensors held, spare capacity included), beside live "
        "bytes (stored tokens only) and the ratio to a 16-bit (fp16/bf16) DynamicCache holding the same tokens.", "",
        f"| config | KL mean | KL max | top-1 | top-1 first {window} (worst text) | NLL | B/tok/head held | "
        "B/tok/head live | held / 16-bit | live / 16-bit | held / 16-bit after prefill | decode ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in report["configs"].items():
        s = cfg["summary"]
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {name} | {s['kl_mean']:.5f} | {s['kl_max']:.4f} | {100 * s['top1_agree']:.1f}% | "
            f"{100 * s[f'{first}_min_text']:.1f}% | {s['nll']:.4f} | {s['bytes_per_token_head']:.1f} | "
            f"{s['live_bytes_per_token_head']:.1f} | {s['ratio_fp16']:.3f} | {s['live_ratio_fp16']:.3f} | "
            f"{s['prefill_ratio_fp16']:.3f} | {s['decode_ms_mean']:.1f} |"
        )
    lines += ["", "Specs: " + ", ".join(f"`{n}` = `{c['spec']}`" for n, c in report["configs"].items()), ""]
    lines += ["## Targets (int8-int4 default; int4-int2 and int2-int2 of issue 16)", ""] + [f"- {t}" for t in report["targets"]] + [""]
    if report.get("theory"):
        lines += ["## Bytes per token per kv-head: QuantSpec.bytes_per_token_head(D) vs measured", "",
                  "Tiny random Llama (2 layers, 1 kv-head), 256 tokens in one forward, residual 0 and no sinks, so "
                  "every token is quantized. `held` = all tensors of the cache; `quantized segment` = its store only.",
                  "", "| D | spec | theory | held | quantized segment | live | 16-bit | theory / 16-bit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["theory"]:
            lines.append(f"| {r['head_dim']} | `{r['spec']}` | {r['theory']} | {r['measured']:.1f} | "
                         f"{r['measured_quantized_segment']:.1f} | {r['live']:.1f} | {r['fp16']} | "
                         f"{r['theory'] / r['fp16']:.3f} |")
        lines.append("")
    if report.get("niah"):
        n = report["niah"]
        lines += [f"## niah_single at {report['settings']['niah_tokens']} tokens, greedy, "
                  f"{report['settings']['niah_new']} new tokens", "",
                  f"Score full = {n[f'{REFERENCE}_score']:.2f}, {DEFAULT_SPEC} = {n[f'{DEFAULT_SPEC}_score']:.2f}; "
                  f"identical answers: {n['identical']}/{len(n['samples'])}.", "",
                  "| sample | prompt tokens | answer | full | int8-int4 |", "|---|---|---|---|---|"]
        for r in n["samples"]:
            cells = [f"{r[k]['score']:.1f} `{r[k]['prediction'].strip()[:60]!r}`" for k in (REFERENCE, DEFAULT_SPEC)]
            answers = ", ".join(r["answers"])
            lines.append(f"| {r['index']} | {r['prompt_tokens']} | {answers} | {cells[0]} | {cells[1]} |")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def targets(configs: dict[str, Any]) -> list[str]:
    """Plain statements of the issue's targets for the default spec."""
    s = configs.get(DEFAULT_SPEC, {}).get("summary", {})
    if "kl_mean" not in s:
        return ["int8-int4 was not run"]
    kl_ok = "MET" if s["kl_mean"] <= 0.003 else "NOT MET"
    held_ok = "MET" if s["ratio_fp16"] <= 0.5 else "NOT MET"
    live_ok = "would be met" if s["live_ratio_fp16"] <= 0.5 else "would not be met either"
    lines = [
        f"KL <= 0.003 nats: {kl_ok} (mean {s['kl_mean']:.5f}, worst single step {s['kl_max']:.4f}).",
        f"<= 0.5x the bytes of a 16-bit DynamicCache: {held_ok} for the bytes held ({s['ratio_fp16']:.3f}x after "
        f"decoding, {s['prefill_ratio_fp16']:.3f}x right after prefill); counting stored tokens only it "
        f"{live_ok} ({s['live_ratio_fp16']:.3f}x).",
    ]
    for name, (max_ratio, max_kl, min_top1) in LOW_BIT_TARGETS.items():  # issue 16
        s = configs.get(name, {}).get("summary", {})
        if "kl_mean" not in s:
            continue
        checks = [("bytes held", s["ratio_fp16"] <= max_ratio, f"{s['ratio_fp16']:.3f}x <= {max_ratio}x"),
                  ("KL", s["kl_mean"] <= max_kl, f"{s['kl_mean']:.5f} <= {max_kl}")]
        if min_top1 is not None:
            checks.append(("top-1", s["top1_agree"] >= min_top1, f"{100 * s['top1_agree']:.1f}% >= {100 * min_top1:.0f}%"))
        lines.append(f"`{name}`: " + "; ".join(f"{label} {'MET' if ok else 'NOT MET'} ({text})"
                                             for label, ok, text in checks) + ".")
    return lines


def notes(configs: dict[str, Any], theory: list[dict]) -> list[str]:
    """Observations computed from the results (slack, window capacity, theory gaps)."""
    out = ["Spare capacity: stores are allocated exactly on their first append and then grow by "
           "max(64 tokens, capacity / 8), so a store that grew holds up to 12.5 % (at least 64 tokens) more than "
           "it stores; quantized stores grow when the fp window flushes blocks of 16 tokens into them."]
    default = configs.get(DEFAULT_SPEC, {}).get("rows", [])
    if default and "error" not in default[0]:
        seg = default[0]["after_decode"]["layer0_segments"]
        window, middle = seg.get("window", {}), seg.get("quantized", {})
        if window.get("capacity", 0) > 2 * max(window.get("length", 0), 1):
            out.append(
                f"The fp window store keeps the capacity of the whole prompt: layer 0 of `{DEFAULT_SPEC}` after "
                f"decoding holds window length {window['length']} in capacity {window['capacity']} (16-bit). The "
                "prompt goes through the window and is flushed with drop_front, which keeps the buffer.")
        elif middle:
            out.append(
                f"Held vs live bytes of `{DEFAULT_SPEC}` after decoding, layer 0: the fp window holds "
                f"{window['length']} tokens in capacity {window['capacity']} (it never needs more than residual + "
                f"16), the quantized store {middle['length']} in capacity {middle['capacity']}.")
    gaps = [r for r in theory if abs(r["measured_quantized_segment"] - r["theory"]) > 1e-6]
    if theory:
        out.append("The quantized segment matches QuantSpec.bytes_per_token_head exactly for every spec and D."
                   if not gaps else f"Quantized-segment bytes differ from theory for {[r['spec'] for r in gaps]}.")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        report = json.loads((RESULTS_DIR / f"{args.out}.json").read_text())
        plot_kl_vs_bytes(report, RESULTS_DIR / f"{args.out}.png")
        return 0
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    quanto_version, hqq_version = package_version("optimum-quanto"), package_version("hqq")
    load_start = os.getloadavg()  # timings are only comparable on an otherwise idle machine
    model, tok = kvpress.load_default_model()
    kvpress.wrap(model)
    t0 = time.perf_counter()
    text_info, results = run_texts(model, tok, args)
    configs = {}
    for name, rows in results.items():
        spec = str(QuantSpec.parse(KVPRESS_CONFIGS[name])) if KVPRESS_CONFIGS.get(name) else (
            "fp32 model dtype" if name in (REFERENCE, "dynamic (sdpa)") else
            f"transformers QuantizedCache(backend={HF_QUANTIZED[name][0]!r}, nbits={HF_QUANTIZED[name][1]}): "
            "q_group_size 64, residual 128")
        configs[name] = {"spec": spec, "summary": summarize(rows, args.agree_window), "rows": rows}
    theory = theory_table()
    niah = needles(model, tok, args) if args.niah_n > 0 else None
    report = {
        "command": command,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "optimum_quanto": quanto_version, "hqq": hqq_version, "threads": args.threads, "cpu": platform.processor() or
                platform.machine(), "model": "SmolLM2-135M-Instruct fp32 (30 layers, 3 kv-heads, head_dim 64)"},
        "settings": {k: v for k, v in vars(args).items() if k != "configs"}, "texts": text_info,
        "configs": configs, "theory": theory, "niah": niah, "elapsed_s": time.perf_counter() - t0,
    }
    report["env"]["loadavg_start_end"] = [load_start, os.getloadavg()]
    report["targets"] = targets(configs)
    report["notes"] = notes(configs, theory)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(report, indent=1))
    (RESULTS_DIR / f"{args.out}.md").write_text(markdown(report))
    plot_kl_vs_bytes(report, RESULTS_DIR / f"{args.out}.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
