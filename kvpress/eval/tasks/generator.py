"""Deterministic RULER-style long-context tasks over real prose, as dicts or a JSONL file (CLI).

Usage: ``python -m kvpress.eval.tasks.generator --task niah_single --n 5 --tokens 2048 --out tasks.jsonl``
(``--task all`` for every family; ``--tokens`` takes several lengths, default 2048 and 4096).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

from kvpress.eval.tasks.assemble import fit_sample
from kvpress.eval.tasks.haystack import paragraph_starts
from kvpress.eval.tasks.kv_retrieval import build_kv_retrieval
from kvpress.eval.tasks.niah import build_niah_multikey, build_niah_multivalue, build_niah_single
from kvpress.eval.tasks.scoring import score
from kvpress.eval.tasks.spec import TaskSpec
from kvpress.eval.tasks.tokens import make_token_counter
from kvpress.eval.tasks.variable_tracking import build_variable_tracking

__all__ = ["DEFAULT_LENGTHS", "TASKS", "make_tasks", "score", "main"]

DEFAULT_LENGTHS = (2048, 4096)

TaskBuilder = Callable[[random.Random, int], TaskSpec]
TASKS: dict[str, TaskBuilder] = {
    "niah_single": build_niah_single,
    "niah_multikey": build_niah_multikey,
    "niah_multivalue": build_niah_multivalue,
    "kv_retrieval": build_kv_retrieval,
    "variable_tracking": build_variable_tracking,
}


def make_tasks(task: str, n: int, context_tokens: int, tokenizer: Any = None, seed: int = 0) -> list[dict]:
    """``n`` samples of ``task`` whose prompts are about ``context_tokens`` long (never longer).

    Sample ``i`` depends only on (task, seed, i), so its needles are the same at every length and for any ``n``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    count_tokens = make_token_counter(tokenizer)
    samples = []
    for index in range(n):
        rng = random.Random(f"{task}:{seed}:{index}")
        spec = TASKS[task](rng, context_tokens)
        start = rng.choice(paragraph_starts())
        fitted = fit_sample(spec, start, context_tokens, count_tokens)
        samples.append({
            "task": task,
            "context": fitted["context"],
            "question": spec.question,
            "answers": list(spec.answers),
            "prompt": fitted["prompt"],
            "length_tokens": fitted["length_tokens"],
            "target_tokens": context_tokens,
            "depths": [round(ins.depth, 4) for ins in spec.insertions],
            "seed": seed,
            "index": index,
        })
    return samples


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options for writing tasks to JSONL."""
    parser = argparse.ArgumentParser(description="Write RULER-style long-context tasks to a JSONL file.")
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"], help="task family, or all")
    parser.add_argument("--n", type=int, default=10, help="samples per task and length")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer name or path for exact token counts")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: generate the requested tasks and write one JSON object per line."""
    args = _parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    names = list(TASKS) if args.task == "all" else [args.task]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with args.out.open("w", encoding="utf-8") as handle:
        for length in args.tokens:
            for name in names:
                for sample in make_tasks(name, args.n, length, tokenizer=tokenizer, seed=args.seed):
                    handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
                    written += 1
    print(f"wrote {written} samples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
