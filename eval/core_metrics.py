"""How simple the core is, read from the code: lines, the longest function, the largest Triton kernel's parameter
count, behaviour switches (environment variables read), and the kvpress modules one decode step passes through.

Usage: `python eval/core_metrics.py [--root DIR] [--json OUT]` (DIR: a checkout whose kvpress/ to measure; default
this one). The decode trace runs a tiny random Llama (head_dim 64) wrapped with int8-int4, prefill then one traced decode step.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def count_lines(package: Path) -> int:
    """Physical lines of every .py file of the package."""
    return sum(len(p.read_text().splitlines()) for p in package.rglob("*.py"))


def functions(package: Path):
    """(qualified name, lines, parameters, is_triton_jit) of every function in the package."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                n_params = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                n_params += bool(args.vararg) + bool(args.kwarg)
                jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                name = f"{path.relative_to(package.parent)}:{node.name}"
                yield name, node.end_lineno - node.lineno + 1, n_params, jit


def env_switches(package: Path) -> list[str]:
    """Names of KVPRESS_* environment variables the package reads that change behaviour (locations excluded)."""
    names = set()
    for path in package.rglob("*.py"):
        text = path.read_text()
        if "os.environ" not in text and "os.getenv" not in text:
            continue
        names.update(re.findall(r"[\"'](KVPRESS_[A-Z_]+)[\"']", text))
    return sorted(n for n in names if not n.endswith("_DIR"))  # *_DIR: where files go, not a behaviour


TRACE_SCRIPT = r"""
import os, sys, json, torch
sys.path.insert(0, os.getcwd())
from transformers import AutoModelForCausalLM, LlamaConfig
import kvpress
from kvpress.hf_compat import cache_kwargs
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
model = kvpress.wrap(model, quant="int8-int4")
ids = torch.randint(3, 128, (1, 300))
cache = kvpress.KVPressCache(model.config, quant="int8-int4")
cache_kw = cache_kwargs(model, cache)  # `cache=` or `past_key_values=`, resolved before the trace
with torch.no_grad():
    out = model(input_ids=ids, **cache_kw, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    model(input_ids=nxt, **cache_kw, use_cache=True)  # warm
    modules = set()
    root = os.path.join(os.getcwd(), "kvpress")
    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            modules.add(os.path.relpath(frame.f_code.co_filename, os.getcwd()))
    env_reads = [0]
    orig_getitem = type(os.environ).__getitem__
    def counting_getitem(self, key):
        if str(key).startswith("KVPRESS_"):
            env_reads[0] += 1
        return orig_getitem(self, key)
    type(os.environ).__getitem__ = counting_getitem
    sys.setprofile(tracer)
    model(input_ids=nxt, **cache_kw, use_cache=True)
    sys.setprofile(None)
print(json.dumps({"modules": sorted(modules), "env_reads_per_layer": env_reads[0] / config.num_hidden_layers}))
"""


def trace_decode(root: Path) -> dict:
    """Modules of `root`/kvpress entered during one int8-int4 decode step of a tiny Llama, and KVPRESS_* reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPRESS_")}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def duplicate_pairs(root: Path) -> int | None:
    """Pair count reported by the `duplicates` tool over root/kvpress (None where the tool is not installed)."""
    try:
        result = subprocess.run(["duplicates", "--repo", str(root / "kvpress"), "--most", "1"], capture_output=True,
                                text=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"(\d+) pairs", result.stdout.strip()) or re.match(r"no duplicates", result.stdout.strip())
    return int(match.group(1)) if match and match.groups() else 0


def measure(root: Path) -> dict:
    package = root / "kvpress"
    funcs = list(functions(package))
    longest = max(funcs, key=lambda f: f[1])
    kernels = [f for f in funcs if f[3]]
    widest_kernel = max(kernels, key=lambda f: f[2]) if kernels else None
    trace = trace_decode(root)
    return {
        "lines": count_lines(package),
        "longest_function": {"name": longest[0], "lines": longest[1]},
        "largest_kernel": None if widest_kernel is None else {"name": widest_kernel[0], "parameters": widest_kernel[2]},
        "env_switches": env_switches(package),
        "decode_step_modules": trace["modules"],
        "decode_step_module_count": len(trace["modules"]),
        "env_reads_per_layer_per_decode_step": trace["env_reads_per_layer"],
        "duplicate_pairs": duplicate_pairs(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = measure(args.root.resolve())
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
