"""Does a row generate the same in a left-padded batch as alone? Greedy tokens of 4 prose prompts of different
lengths (default model, CPU), batch of 4 vs batch 1, per quantization setting.

    python eval/bench_batch_invariance.py --quants none int8-int4

Writes eval/results/batch_invariance.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kvpress
from kvpress.eval.tasks.haystack import read_window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quants", nargs="+", default=["none", "int8-int4"])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="eval/results/batch_invariance.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = kvpress.load_default_model()
    tok.padding_side = "left"
    texts = [" ".join(s.text for s in read_window(100 * i, 40 + 60 * i)) for i in range(4)]
    prompts = [t[: 300 + 500 * i] + "\nSummary:" for i, t in enumerate(texts)]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    enc = tok(prompts, return_tensors="pt", padding=True)
    lengths = enc.attention_mask.sum(1).tolist()
    rows = []
    for quant in args.quants:
        kvpress.wrap(model, quant=None if quant == "none" else quant)
        with torch.no_grad():
            alone = [model.generate(**tok([p], return_tensors="pt"), **kw)[0, -args.new_tokens:].tolist()
                     for p in prompts]
            batched = model.generate(**enc, **kw)[:, -args.new_tokens:].tolist()
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(alone, batched)]
        rows.append({"quant": quant, "prompt_tokens": lengths, "padding": [max(lengths) - n for n in lengths],
                     "same_tokens_as_alone": same, "new_tokens": args.new_tokens})
        print(f"quant={quant:10s} padding={rows[-1]['padding']} same tokens as alone (of {args.new_tokens}): {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python eval/bench_batch_invariance.py " + " ".join(sys.argv[1:]),
                               "model": "SmolLM2-135M-Instruct fp32, CPU", "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
