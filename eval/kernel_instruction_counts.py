"""Static SASS instruction counts of the decode kernels, compiled ahead of time for an H100 (sm_90) on a machine
without a GPU: the kernels are compiled - never launched - through their real launchers (so argument specialization
is exactly what a call makes) with Triton's bundled ptxas behind a stand-in driver, and nvdisasm's listing is counted:
instructions in the main loop (the loop over key/value tiles: instructions between a backward branch and its target;
loops nested inside are included) and in the whole kernel (NOPs not counted). The multi-store kernel with one
store is measured (decode_attention_multi_triton); trees from before issue 12 also had the one-store
`_split_attention_kernel` and took stores as tuples: both are measured there.

These are instruction counts of the compiled code, not timings: fewer instructions per loop iteration is a proxy
for less issue pressure, nothing more.

Compare two versions of the package (e.g. the committed one and the working tree):

    mkdir -p /tmp/kvpress_before && git archive HEAD kvpress | tar -x -C /tmp/kvpress_before
    .venv/bin/python eval/kernel_instruction_counts.py --before /tmp/kvpress_before \\
        --json eval/results/kernel_instructions_issue12.json

or pass `--before` a git checkout of an older commit (its own HEAD is recorded as "before").
Each version is compiled in its own subprocess (PYTHONPATH=<root>, TRITON_INTERPRET unset, a fresh Triton cache dir).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS_UNAVAILABLE = 3

# name: (head_dim, k_bits, v_bits, k_group, v_group, page_size or None for the contiguous store)
CONFIGS = {
    "d128-int8k-int4v-vgNone-contiguous": (128, 8, 4, None, None, None),
    "d128-int8k-int4v-vgNone-paged16": (128, 8, 4, None, None, 16),
    "d128-int8k-int4v-vg32-contiguous": (128, 8, 4, None, 32, None),
    "d128-int8k-int4v-vg32-paged16": (128, 8, 4, None, 32, 16),
    "d128-int8k-int4v-vg32-paged12": (128, 8, 4, None, 32, 12),
    "d128-fp16-contiguous": (128, 16, 16, None, None, None),
    "d128-fp16-paged16": (128, 16, 16, None, None, 16),
    "d64-int8k-int4v-vgNone-contiguous": (64, 8, 4, None, None, None),
    "d64-int8k-int4v-vgNone-paged16": (64, 8, 4, None, None, 16),
    "d64-int8k-int4v-vg32-contiguous": (64, 8, 4, None, 32, None),
    "d64-int8k-int4v-vg32-paged16": (64, 8, 4, None, 32, 16),
    "d64-fp16-contiguous": (64, 16, 16, None, None, None),
    "d64-fp16-paged16": (64, 16, 16, None, None, 16),
}
BATCH, KV_HEADS, GROUP = 4, 8, 4  # decode: 4 query heads per kv head -> block_m 16, block_n 32, 4 warps
CONTIGUOUS_CAPACITY = 1000  # a contiguous store's capacity is any number (it grows by ~1/16)
PAGED_TOKENS = 1024
KEY_OPS = ("HMMA", "HFMA2", "HADD2", "HMUL2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "PRMT", "LOP3", "IMAD",
           "IADD3", "LEA", "SHF", "ISETP", "SEL", "LDG", "LDS", "STS", "LDSM", "SHFL", "MUFU", "LDGSTS",
           "BAR")  # fmt: skip


def _store(head_dim, k_bits, v_bits, k_group, v_group, page_size):
    """Zero-filled store fields (values do not matter for compilation; shapes, dtypes and strides do), as the
    pre-issue-12 argument tuple and (k_bits, v_bits, k_group, v_group)."""
    import torch

    def field(bits, group, pages, slots):
        width = head_dim if bits != 4 else head_dim // 2
        dtype = torch.float16 if bits == 16 else torch.uint8
        codes = torch.zeros(pages, KV_HEADS, slots, width, dtype=dtype)
        if bits == 16:
            return codes, None, None
        groups = head_dim // (group or head_dim)
        scale = torch.ones(pages, KV_HEADS, slots, groups, dtype=torch.float16)
        return codes, scale, torch.zeros_like(scale)

    if page_size is None:
        pages, slots, table = BATCH, CONTIGUOUS_CAPACITY, torch.arange(BATCH, dtype=torch.int32)[:, None]
        tokens = CONTIGUOUS_CAPACITY
    else:
        per_row = PAGED_TOKENS // page_size
        pages, slots = BATCH * per_row + 3, page_size
        table = torch.randperm(pages)[: BATCH * per_row].reshape(BATCH, per_row).to(torch.int32)
        tokens = per_row * page_size
    k, ks, kz = field(k_bits, k_group, pages, slots)
    v, vs, vz = field(v_bits, v_group, pages, slots)
    start = torch.zeros(BATCH, dtype=torch.int32)
    end = torch.full((BATCH,), tokens - 5, dtype=torch.int32)
    return (k, v, ks, kz, vs, vz, table, start, end), (k_bits, v_bits, k_group, v_group)


def _count(cubin: bytes, nvdisasm: str) -> dict:
    """Instructions of the whole kernel and of its loops (outermost backward-branch spans, in address order), and
    registers per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        cuobjdump = os.path.join(os.path.dirname(nvdisasm), "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    instrs, labels, pending = [], {}, []
    for line in listing.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    spans = []
    for addr, text in instrs:
        m = re.search(r"BRA.*`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1)) is not None and labels[m.group(1)] < addr:
            spans.append((labels[m.group(1)], addr))
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    outer = sorted(set(outer))

    def opcode(text):
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text)
        return m.group(1) if m else "?"

    def body(lo, hi):
        ops = collections.Counter(opcode(t) for a, t in instrs if lo <= a <= hi and opcode(t) not in ("NOP",))
        return ops

    total = body(0, 1 << 62)
    loops = []
    for lo, hi in outer:
        ops = body(lo, hi)
        loops.append({"instructions": sum(ops.values()), "ops": {k: ops[k] for k in KEY_OPS if ops[k]}})
    return {"total": sum(total.values()), "loops": loops, "registers": int(registers.group(1)) if registers else None}


def worker(configs: list[str]) -> None:
    """Compile every config through the launchers (stand-in driver) and print one JSON line of counts."""
    import importlib.util

    import triton

    # the harness always comes from this checkout (the measured kvpress may be an older tree without it)
    spec = importlib.util.spec_from_file_location(
        "compile_only", Path(__file__).resolve().parents[1] / "kvpress" / "kernels" / "compile_only.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    compiled = harness.install_compile_only(90)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    import torch

    import kvpress.kernels.decode as decode
    from kvpress.kernels.multi import decode_attention_multi_triton

    try:
        from kvpress.kernels.store import KVStore
    except ImportError:  # a tree from before issue 12: stores are tuples, and the one-store kernel exists
        KVStore = None
    results = {"kvpress": str(Path(decode.__file__).resolve().parents[2])}
    for name in configs:
        head_dim, k_bits, v_bits, k_group, v_group, page_size = CONFIGS[name]
        args, bits = _store(head_dim, k_bits, v_bits, k_group, v_group, page_size)
        q = torch.zeros(BATCH, KV_HEADS * GROUP, head_dim, dtype=torch.float16)
        entry = {}
        if KVStore is None:
            calls = (
                ("_split_attention_kernel", lambda: decode.decode_attention_triton(q, *args, 0.1, *bits)),
                ("_multi_split_attention_kernel",
                 lambda: decode_attention_multi_triton(q, ((*args, *bits),), 0.1, out_dtype=torch.float16)),
            )  # fmt: skip
        else:
            names = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero", "block_table", "kv_start", "kv_end")
            store = KVStore(**dict(zip(names, args)), **dict(zip(("k_bits", "v_bits", "k_group", "v_group"), bits)))
            calls = (("_multi_split_attention_kernel",
                      lambda: decode_attention_multi_triton(q, (store,), 0.1, out_dtype=torch.float16)),)
        for kernel_name, call in calls:
            compiled.clear()
            call()
            kernel = next(k for n, k in compiled if n == kernel_name)
            counts = _count(kernel.asm["cubin"], nvdisasm)
            counts["num_warps"] = kernel.metadata.num_warps
            entry[kernel_name] = counts
        results[name] = entry
    print("RESULT " + json.dumps(results))


def run_version(root: str, configs: list[str]) -> dict:
    """Counts of one copy of the package (its root holds kvpress/), with its default dequantization."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVPRESS_DEQUANT")}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", *configs],
            env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
        )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"compiling {root} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _head_commit(root: str | Path) -> str | None:
    """HEAD commit of the git checkout at `root`, if it is one (and git is there)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def _describe(root: str) -> str:
    """A measured tree: its own git HEAD when it is a checkout (e.g. a worktree of an older commit), else the HEAD
    of this checkout (what `git archive HEAD` exports), plus its path."""
    own = _head_commit(root)
    if own is not None and Path(root).resolve() != ROOT:
        return f"git {own} ({root})"
    return f"git HEAD {_head_commit(ROOT)} ({root})"


def _loop(counts: dict) -> int:
    return counts["loops"][0]["instructions"] if counts["loops"] else 0


KERNELS = (("_multi_split_attention_kernel", "multi"), ("_split_attention_kernel", "split"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="root of another copy of the package (holding kvpress/) to compare with")
    parser.add_argument("--after", default=str(ROOT), help="root of the package to measure (default: this checkout)")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("configs", nargs="*", help=f"configs (default all): {', '.join(CONFIGS)}")
    opts = parser.parse_args()
    configs = opts.configs or list(CONFIGS)
    if opts.worker:
        worker(configs)
        return
    roots = {"after": opts.after, **({"before": opts.before} if opts.before else {})}
    versions = {v: run_version(root, configs) for v, root in roots.items()}
    print(f"{'config':38s} {'kernel':6s} " + " ".join(
        f"{v + ' ' + what:>13s}" for v in reversed(roots) for what in ("loop", "total")))  # fmt: skip
    summary = {}
    for name in configs:
        for kernel, short in KERNELS:
            counts = {v: versions[v][name].get(kernel) for v in reversed(roots)}
            cells = {f"{v}_{what}": (None if c is None else _loop(c) if what == "loop" else c["total"])
                     for v, c in counts.items() for what in ("loop", "total")}  # fmt: skip
            if all(value is None for value in cells.values()):
                continue
            summary.setdefault(name, {})[short] = cells
            print(f"{name:38s} {short:6s} " + " ".join(f"{'-' if x is None else x:>13}" for x in cells.values()))
    if opts.json:
        import triton

        command = " ".join([".venv/bin/python eval/kernel_instruction_counts.py", *sys.argv[1:]])
        out = {
            "what": "SASS instruction counts (static, sm_90, compiled without a GPU through the launchers: "
            "decode_attention_multi_triton with one store -> _multi_split_attention_kernel; trees before issue 12 "
            "also decode_attention_triton -> _split_attention_kernel); 'loop' = instructions in the key/value "
            "tile loop (first outermost loop), 'total' = whole kernel. Instruction counts, not timings.",
            "command": command,
            "triton": triton.__version__,
            "before": _describe(opts.before) if opts.before else None,
            "after": f"working tree ({opts.after})",
            "shapes": {"batch": BATCH, "kv_heads": KV_HEADS, "gqa_group": GROUP, "q_dtype": "float16",
                       "block_m": 16, "block_n": 32, "num_warps": 4,
                       "contiguous_capacity": CONTIGUOUS_CAPACITY, "paged_tokens_per_row": PAGED_TOKENS},
            "configs": {name: dict(zip(("head_dim", "k_bits", "v_bits", "k_group", "v_group", "page_size"),
                                       CONFIGS[name])) for name in configs},
            "summary": summary,
            "details": versions,
        }  # fmt: skip
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
