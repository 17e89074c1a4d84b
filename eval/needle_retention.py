"""Where a press loses the needle: for each layer, the share of kv heads that still hold every token of the answer
after the compression (query-agnostic: of the context; aware: of the whole prompt), next to whether the model then
answered.

    python eval/needle_retention.py --presses kvzip:0.75 kvzip:0.75:budget=global --n 5 --length 2048

Writes eval/results/needle_retention_<tag>.json and .md. The kept tokens are read from the press's own selection
(BasePress.select per layer and row, keep_masks for per-head budgets), recorded while bench_presses.run_one
runs, so the numbers describe exactly the runs that were scored.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_presses  # noqa: E402

import kvpress  # noqa: E402
from kvpress.eval.tasks.generator import make_tasks  # noqa: E402
from kvpress.pipeline import split_prompt  # noqa: E402
from kvpress.presses.base import BasePress  # noqa: E402


class SelectionRecorder:
    """Records every keep decision of every press while active: (B=1, H, T) bool masks, one per pressed layer."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self._select, self._keep_masks = BasePress.select, BasePress.keep_masks

    def __enter__(self) -> SelectionRecorder:
        recorder = self

        def select(press, scores, n_keep, valid):
            kept = recorder._select(press, scores, n_keep, valid)
            mask = torch.zeros(scores.shape, dtype=torch.bool)
            recorder.masks.append(mask.scatter_(2, kept.cpu(), True))
            return kept

        def keep_masks(press, ranked, budgets):
            masks = recorder._keep_masks(press, ranked, budgets)
            recorder.masks.extend(m.cpu() for m in masks)
            return masks

        BasePress.select, BasePress.keep_masks = select, keep_masks
        return self

    def __exit__(self, *exc) -> None:
        BasePress.select, BasePress.keep_masks = self._select, self._keep_masks


def answer_positions(tok, sample: dict) -> list[int]:
    """Token positions of the context prefix that overlap the first occurrence of each expected answer."""
    prompt, question = sample["prompt"], sample["question"]
    context = prompt[: -len(question)].removesuffix("\n\n")
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": f"{context}\n\n@@Q@@"}],
                                       add_generation_prompt=True, tokenize=False).split("@@Q@@")[0]
    else:
        text = f"{context}\n\n"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    positions = []
    for answer in sample["answers"]:
        start = text.find(answer)
        if start < 0:
            continue
        end = start + len(answer)
        positions += [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return sorted(set(positions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presses", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--task", default="niah_single")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--protocol", choices=("agnostic", "aware"), default="agnostic")
    parser.add_argument("--tag", default="issue15")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = kvpress.load_default_model()
    model = kvpress.wrap(model)
    bench_args = bench_presses.parse_args(["--protocol", args.protocol, "--threads", str(args.threads)])
    samples = make_tasks(args.task, args.n, args.length, tokenizer=tok)
    records = []
    for sample in tqdm(samples, desc="samples"):
        positions = answer_positions(tok, sample)
        context_len = split_prompt(tok, sample["prompt"][: -len(sample["question"])].removesuffix("\n\n"),
                                   [sample["question"]])[0].shape[1]
        for spec in args.presses:
            with SelectionRecorder() as recorder:
                record = bench_presses.run_one(model, tok, sample, spec, bench_args)
            if "error" in record:
                raise RuntimeError(record["error"])
            context_masks = [m[0, :, :context_len] for m in recorder.masks[: model.config.num_hidden_layers]]
            held = [float(m[:, positions].all(dim=1).float().mean()) for m in context_masks]
            records.append({"press": spec, "index": sample["index"], "answer_tokens": positions,
                            "score": record["score"], "heads_holding_answer": held})
    rows = []
    for spec in args.presses:
        group = [r for r in records if r["press"] == spec]
        per_layer = [statistics.fmean(r["heads_holding_answer"][i] for r in group)
                     for i in range(len(group[0]["heads_holding_answer"]))]
        rows.append({"press": spec, "accuracy": statistics.fmean(r["score"] for r in group),
                     "heads_holding_answer_per_layer": per_layer})
    out = Path(__file__).resolve().parent / "results" / f"needle_retention_{args.tag}"
    command = "python eval/needle_retention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "records": records}, indent=1))
    lines = [f"# Needle retention per layer ({args.task}, {args.length} tokens, n={args.n}, {args.protocol})", "",
             f"`{command}`", "", "Share of kv heads holding every answer token after compression, per layer "
             "(layer 0 first), and accuracy.", "", "| press | accuracy | per layer |", "|---|---|---|"]
    for row in rows:
        layers = " ".join(f"{100 * x:.0f}" for x in row["heads_holding_answer_per_layer"])
        lines.append(f"| {row['press']} | {100 * row['accuracy']:.0f} | {layers} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
