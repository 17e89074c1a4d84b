"""Host time of one decode step per layer, measured on CPU with every Triton launch stubbed out: the Python and torch
dispatch work that kvpress adds around its kernels (argument checks, launch arguments, cache bookkeeping, H2O's
eviction), beside transformers' DynamicCache on the same tiny model. Not a GPU timing: Triton's own launch cost
(binding ~150 arguments, tens of us on a GPU host) and every kernel's run time are left out, and the tensors are tiny
so that compute is negligible. Outputs of stubbed kernels are uninitialised memory; only the time is meaningful.

    python eval/bench_host.py          # writes eval/results/host_overhead.json, prints a table
    # an older tree, e.g. before the launch plans: export it and put it first on the path
    git archive 55862ab kvpress | tar -x -C /tmp/kv_55862ab
    PYTHONPATH=/tmp/kv_55862ab python eval/bench_host.py --label 55862ab --out eval/results/host_overhead_55862ab.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "host_overhead.json"
H2O = "h2o:0.0:max_tokens=200,recent=8"
VARIANTS = {  # name: KVPressCache kwargs (None: DynamicCache on the plain model)
    "DynamicCache (SDPA)": None,
    "kvpress fp": {},
    "kvpress int8-int4": {"quant": "int8-int4"},
    f"kvpress int8-int4 + {H2O}": {"quant": "int8-int4", "press": H2O},
}


def stub_triton_launches() -> None:
    """Every @triton.jit kernel call returns at once (nothing compiled, nothing run)."""
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, **kwargs: None


def cache_kw(model, cache) -> dict:
    """{name: cache} for a forward call (kvpress.hf_compat.cache_kwargs: `cache=` on transformers >= 5.24, no
    deprecation warning); measured trees from before that helper get the same rule from the forward's signature."""
    try:
        from kvpress.hf_compat import cache_kwargs
    except ImportError:
        import inspect

        return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    return cache_kwargs(model, cache)


def step_us_per_layer(model, cache, prompt: int, steps: int, warmup: int) -> float:
    """Median wall time of one single-token forward after a `prompt`-token prefill, divided by the layer count
    (each variant's fastest repetition is reported: noise on a shared CPU only ever adds time)."""
    import torch

    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    samples = []
    kw = cache_kw(model, cache)
    with torch.no_grad():
        model(input_ids=ids, **kw, use_cache=True)
        token = ids[:, -1:]
        for _ in range(warmup + steps):
            start = time.perf_counter()
            model(input_ids=token, **kw, use_cache=True)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples[warmup:]) * 1e6 / model.config.num_hidden_layers


def _command(argv: list[str] | None) -> str:
    """How this run was started (PYTHONPATH included: it selects the measured tree)."""
    import shlex
    import sys

    words = ["python", "eval/bench_host.py", *(sys.argv[1:] if argv is None else argv)]
    prefix = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return prefix + shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; the fastest is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="working tree", help="what was measured (e.g. an older tree's commit)")
    args = parser.parse_args(argv)
    os.environ["KVPRESS_KERNELS"] = "triton"  # the GPU code path, its launches stubbed
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    import kvpress

    stub_triton_launches()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # variants interleaved, so that a slow spell of a shared CPU hits them alike
        for name, kwargs in VARIANTS.items():
            kvpress.unwrap(model)
            if kwargs is None:
                cache = DynamicCache(config=config)
            else:
                kvpress.wrap(model)
                cache = kvpress.KVPressCache(config, **kwargs)
            samples[name].append(step_us_per_layer(model, cache, args.prompt, args.steps, 10))
    rows = [{"variant": name, "us_per_layer_step": min(values), "repeats_us": values}
            for name, values in samples.items()]  # fmt: skip
    base = rows[0]["us_per_layer_step"]
    for row in rows:
        row["extra_us_vs_dynamic"] = row["us_per_layer_step"] - base
        print(f"{row['variant']:60s} {row['us_per_layer_step']:8.1f} us/layer-step  ({row['extra_us_vs_dynamic']:+.1f})")
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "label": args.label,
           "kvpress": str(Path(kvpress.__file__).resolve().parents[1]), "command": _command(argv),
           "torch": torch.__version__, "threads": 1, "layers": args.layers, "prompt": args.prompt,
           "steps": args.steps, "repeats": args.repeats, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
