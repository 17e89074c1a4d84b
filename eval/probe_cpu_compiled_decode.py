"""Would a compiled CPU kernel close the int8-int4 decode gap (issue 14)? One layer's decode attention, timed three ways.

Why: the torch twin of the int8-K/int4-V decode (kernels/reference.py) converts codes to float32 in cache-sized
chunks and multiplies (GEMV-shaped matmuls); in the model that costs 1.25x the full cache's step, one fused SDPA over
float32 keys and values. A kernel that reads the codes and reduces them in one loop would read a quarter of the
bytes. This probe measures, on the default model's shapes (3 kv heads, 3 query heads each, head_dim 64):
- `sdpa_fp32`: what the full cache does (SDPA over float32 K/V of the same tokens, enable_gqa);
- `twin`: decode_attention_multi_reference over one int8-int4 store (keys one group, values two groups of 32);
- `compiled`: the same math from the codes (s * (q.c) + z * sum(q) per token; (p * s) @ c + p @ z per value part)
  written as broadcast-and-reduce and compiled by torch.compile (inductor's C++ loops), with its compile time and
  the time of a call at another length (dynamic shapes, no second compile);
- `c_kernel`: what the library now runs on the CPU, kernels/cpu_decode.c through decode_attention_multi_cpu (built
  once per machine with the host's C compiler, about a second; its build time is reported).
Best of `--rounds` medians (thread CPU time at one thread, wall time at more). Not a kernel of the library: evidence for the next step.

    python eval/probe_cpu_compiled_decode.py --tokens 3072 --threads 1 2 --json eval/results/cpu_compiled_decode_probe.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpress.kernels import KVStore
from kvpress.kernels.affine import quantize
from kvpress.kernels import cpu_decode
from kvpress.kernels.cpu_multi import decode_attention_multi_cpu
from kvpress.kernels.reference import decode_attention_multi_reference

KV_HEADS, GROUP, HEAD_DIM, VALUE_GROUP = 3, 3, 64, 32  # SmolLM2-135M: 9 query heads over 3 kv heads


def codes_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q (Hkv, R, D) over int8 keys (Hkv, T, D) with one fp16 (scale, zero) per token (Hkv, T, 1) and 4-bit values
    (Hkv, T, D / 2) split halves with one group per half (Hkv, T, 2): out (Hkv, R, D) float32, from the codes."""
    qs = q * sm_scale
    dots = (qs[:, :, None, :] * k_codes[:, None].float()).sum(-1)  # (Hkv, R, T): one reduction loop once compiled
    logits = dots * k_scale[:, None, :, 0].float() + qs.sum(-1, keepdim=True) * k_zero[:, None, :, 0].float()
    probs = (logits - logits.amax(-1, keepdim=True)).exp()
    weights = probs[..., None] * v_scale[:, None].float()  # (Hkv, R, T, 2)
    low, high = (v_codes & 15).float(), (v_codes >> 4).float()
    out_low = (weights[..., 0, None] * low[:, None]).sum(2)
    out_high = (weights[..., 1, None] * high[:, None]).sum(2)
    zeros = (probs[..., None] * v_zero[:, None].float()).sum(2)  # (Hkv, R, 2)
    out = torch.cat([out_low + zeros[..., :1], out_high + zeros[..., 1:]], -1)
    return out / probs.sum(-1, keepdim=True)


def cpu_ms(fn, calls: int, rounds: int, clock=time.thread_time) -> float:
    """Best of `rounds` medians of one call's time on `clock` (thread CPU time for one thread, wall time for more),
    in ms."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(calls):
            start = clock()
            fn()
            times.append(clock() - start)
        best = min(best, statistics.median(times))
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch threads per timing row (1: thread CPU time; more: wall time of an idle machine)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    tokens, sm_scale = args.tokens, HEAD_DIM**-0.5
    keys = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen) * 2
    values = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen)
    q = torch.randn(1, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    k_codes, k_scale, k_zero = quantize(keys, 8, None)
    v_codes, v_scale, v_zero = quantize(values, 4, VALUE_GROUP)
    store = KVStore(k=k_codes, v=v_codes, block_table=torch.zeros(1, 1, dtype=torch.int32), kv_end=tokens,
                    k_bits=8, v_bits=4, k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero,
                    v_group=VALUE_GROUP)
    twin_out = decode_attention_multi_reference(q, (store,), sm_scale)[0]
    k_float = k_codes.float() * k_scale.float() + k_zero.float()
    v_float = torch.cat([(v_codes & 15).float() * v_scale[..., :1].float() + v_zero[..., :1].float(),
                         (v_codes >> 4).float() * v_scale[..., 1:].float() + v_zero[..., 1:].float()], -1)
    q4 = q[:, :, None]

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q4, k_float, v_float, scale=sm_scale, enable_gqa=True)

    grouped_q = q.view(KV_HEADS, GROUP, HEAD_DIM)
    fields = (k_codes[0], k_scale[0], k_zero[0], v_codes[0], v_scale[0], v_zero[0])
    start = time.perf_counter()
    compiled = torch.compile(codes_attention, dynamic=True)
    compiled_out = compiled(grouped_q, *fields, sm_scale).reshape(1, KV_HEADS * GROUP, HEAD_DIM)
    compile_s = time.perf_counter() - start
    shorter = tuple(f[:, : tokens - 17].contiguous() for f in fields)
    start = time.perf_counter()
    compiled(grouped_q, *shorter, sm_scale)
    other_length_s = time.perf_counter() - start
    start = time.perf_counter()
    cpu_decode.build()
    c_build_s = time.perf_counter() - start
    c_out = decode_attention_multi_cpu(q, (store,), sm_scale)[0]
    report = {
        "command": "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "shape": {"tokens": tokens, "kv_heads": KV_HEADS, "query_heads_per_kv_head": GROUP, "head_dim": HEAD_DIM,
                  "keys": "int8, one group", "values": f"int4, groups of {VALUE_GROUP}"},
        "max_abs_diff_vs_twin": {"sdpa_fp32_on_dequantized": float((sdpa()[:, :, 0] - twin_out).abs().max()),
                                 "compiled": float((compiled_out - twin_out).abs().max()),
                                 "c_kernel": float((c_out - twin_out).abs().max())},
        "compile_s": compile_s, "call_at_other_length_s": other_length_s, "c_kernel_build_or_load_s": c_build_s,
    }
    calls = {"sdpa_fp32": sdpa, "twin": lambda: decode_attention_multi_reference(q, (store,), sm_scale),
             "compiled": lambda: compiled(grouped_q, *fields, sm_scale),
             "c_kernel": lambda: decode_attention_multi_cpu(q, (store,), sm_scale)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        report[f"ms_per_layer_call_{threads}_threads"] = {
            name: cpu_ms(fn, args.calls, args.rounds, clock) for name, fn in calls.items()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
