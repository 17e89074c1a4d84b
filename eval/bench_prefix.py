"""Prefix sharing on the default model (CPU): time to first token with and without the PrefixCache, physical KV
bytes for many requests sharing a long prefix, and page waste over a random mix of lengths.

    python eval/bench_prefix.py --prefix-tokens 3000 --suffix-tokens 100 --requests 16
    python eval/bench_prefix.py --quant int8-int4 --out eval/results/prefix_int8-int4

Writes eval/results/prefix.json and eval/results/prefix.md (or --out). With --quant/--press every request (with and
without the prefix cache) compresses; the shared pages are full precision and each request holds its own compressed
copy, except that with --quant alone the pool also keeps the codes and requests read their quantized middle in place
(docs/ARCHITECTURE.md); the memory rows then compare compressed requests with and without sharing.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import kvpress
from kvpress.eval.tasks.haystack import read_window


def _text_ids(tok, n: int, offset: int) -> list[int]:
    text = " ".join(s.text for s in read_window(offset, 6 * n // 10 + 200))
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) < n:
        raise ValueError(f"haystack too short for {n} tokens")
    return ids[:n]


def time_to_first_token(model, prompt: list[int]) -> tuple[float, list[int]]:
    """Seconds until the first new token (one generate step: prefill + first token), and that token."""
    start = time.perf_counter()
    out = kvpress.generate_many(model, [prompt], max_new_tokens=1, do_sample=False, eos_token_id=None)
    return time.perf_counter() - start, out[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix-tokens", type=int, default=3000)
    parser.add_argument("--suffix-tokens", type=int, default=100)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default=None, help="e.g. int8-int4 (default: none)")
    parser.add_argument("--press", default=None, help="e.g. snapkv:0.5 (default: none)")
    parser.add_argument("--out", default="eval/results/prefix")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = kvpress.load_default_model()
    doc = _text_ids(tok, args.prefix_tokens, 0)
    suffixes = [_text_ids(tok, args.suffix_tokens, 1000 + 97 * i) for i in range(args.requests + 1)]
    first, second = doc + suffixes[0], doc + suffixes[1]

    compression = dict(press=args.press, quant=args.quant)
    kvpress.wrap(model, **compression)
    ttft_plain, token_plain = time_to_first_token(model, second)
    # with --quant the pool also keeps that encoding's codes, read in place by the quantized requests
    cache = kvpress.PrefixCache(max_tokens=4 * (args.prefix_tokens + args.suffix_tokens) + 4096, quant=args.quant)
    kvpress.wrap(model, paged=True, prefix_cache=cache, **compression)
    time_to_first_token(model, first)  # fills the prefix cache
    computed = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: computed.append(a[0].numel()))
    ttft_cached, token_cached = time_to_first_token(model, second)
    hook.remove()

    # 16 requests sharing the document, one batch: private KV per request vs 16 unshared caches
    prompts = [doc + s for s in suffixes[1 : args.requests + 1]]
    kvpress.generate_many(model, prompts, batch_size=args.requests, max_new_tokens=2, do_sample=False,
                          eos_token_id=None)
    private = kvpress.last_generate_stats(model)["nbytes"]
    pool_stats = cache.stats()
    kvpress.wrap(model, **compression)
    kvpress.generate_many(model, prompts[:1], max_new_tokens=2, do_sample=False, eos_token_id=None)
    one_unshared = kvpress.last_generate_stats(model)["nbytes"]

    # page waste: bytes allocated vs bytes needed over a random mix of lengths
    waste_cache = kvpress.PrefixCache(max_tokens=64 * 1024)
    rng = random.Random(0)
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    needed = allocated = offered = 0
    for i in range(40):
        n = rng.randint(20, 1500)
        offered += n
        ids = [rng.randrange(3, 40000) for _ in range(n)]
        kv = [{"k": torch.zeros(heads, n, dim), "v": torch.zeros(heads, n, dim)} for _ in range(layers)]
        stored = waste_cache.store(f"w{i}", ids, kv)
        needed += stored
    page_tokens = waste_cache.stats()["pages_used"] * waste_cache.page_size
    allocated = page_tokens
    result = {
        "model": "SmolLM2-135M-Instruct fp32, CPU", "threads": args.threads, "press": args.press,
        "quant": args.quant, "same_first_token": token_plain == token_cached,
        "command": "python eval/bench_prefix.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "ttft_without_prefix_cache_s": ttft_plain, "ttft_with_prefix_cache_s": ttft_cached,
        "ttft_speedup": ttft_plain / ttft_cached,
        "prompt_tokens": len(second), "tokens_computed_with_cache": sum(computed),
        "requests": args.requests, "private_kv_bytes_all_requests": private,
        "shared_pool_bytes_used": pool_stats["pages_used"] * (pool_stats["nbytes"] // pool_stats["pages_total"]),
        "unshared_kv_bytes_one_request": one_unshared,
        "unshared_kv_bytes_all_requests": one_unshared * args.requests,
        "page_waste_tokens_needed": needed, "page_waste_tokens_allocated": allocated,
        "page_waste_fraction": 1 - needed / allocated if allocated else 0.0,
        "tokens_offered": offered, "tail_tokens_not_cached_fraction": 1 - needed / offered,
    }
    physical = result["private_kv_bytes_all_requests"] + result["shared_pool_bytes_used"]
    result["physical_vs_unshared"] = physical / result["unshared_kv_bytes_all_requests"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mib = 1 << 20
    out.with_suffix(".md").write_text(
        f"# Prefix sharing (default model, CPU; press={args.press}, quant={args.quant})\n\n"
        f"Command: `{result['command']}`\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| TTFT, {len(second)}-token prompt, no prefix cache | {ttft_plain:.2f} s |\n"
        f"| TTFT, same prompt sharing {args.prefix_tokens} tokens with a cached one | {ttft_cached:.2f} s |\n"
        f"| speed-up | {result['ttft_speedup']:.1f}x |\n"
        f"| same first token with and without the prefix cache | {result['same_first_token']} |\n"
        f"| prompt tokens computed with the cache | {sum(computed)} of {len(second)} |\n"
        f"| {args.requests} requests: private KV (all) | {private / mib:.1f} MiB |\n"
        f"| shared prefix pages (pool, used) | {result['shared_pool_bytes_used'] / mib:.1f} MiB |\n"
        f"| {args.requests} unshared caches | {result['unshared_kv_bytes_all_requests'] / mib:.1f} MiB |\n"
        f"| physical / unshared | {result['physical_vs_unshared']:.3f} |\n"
        f"| page slack (allocated - stored) over 40 random lengths, page size {waste_cache.page_size} | "
        f"{100 * result['page_waste_fraction']:.2f}% |\n"
        f"| tokens offered but not cached (each sequence's partial last page) | "
        f"{100 * result['tail_tokens_not_cached_fraction']:.2f}% |\n"
        f"\nTimes are wall-clock on a shared 2-core CPU; private KV includes store growth slack.\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
