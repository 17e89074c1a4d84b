"""Accuracy vs KV-cache bytes of each eviction press on the default model (SmolLM2-135M-Instruct, CPU).

Every (length, task, sample) prompt is answered greedily once per press config through a fresh KVPressCache; the
cache's real bytes are read right after generation, beside what a 16-bit DynamicCache would hold. The point is to
see which presses keep needle-retrieval accuracy at a given memory budget (issue "eviction presses").
Writes eval/results/presses_<tag>.json (records + aggregates), a markdown table (presses.md for the default tag)
and a PNG of accuracy vs KV bytes. Results are saved after every run; --resume skips runs already saved and
--report-only rewrites the table and plot of a stopped run (counting only samples that every press saw).

    python eval/bench_presses.py --n 1 --lengths 1024                     # smoke run (minutes)
    python eval/bench_presses.py --n 5 --tasks niah_single niah_multikey kv_retrieval --lengths 2048 4096
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kvpress
from kvpress.config import resolve_config
from kvpress.eval.tasks.generator import DEFAULT_LENGTHS, TASKS, make_tasks, score
from kvpress.hf_compat import cache_kwargs
from kvpress.pipeline import compressed_context, split_prompt
from kvpress.runner import GenerationReport, generate_with_report
from press_plot import plot_accuracy_vs_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_TAG = "smollm2"
DEFAULT_TASKS = ("niah_single", "niah_multikey", "kv_retrieval")
DEFAULT_PRESSES = ("full", "snapkv:0.5", "snapkv:0.75", "h2o:0.5", "h2o:0.75", "streaming:0.5", "knorm:0.5",
                   "random:0.5")
FULL = "full"  # press spec meaning "no press" (the uncompressed reference)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; press specs are validated here, before the model loads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context tokens")
    parser.add_argument("--n", type=int, default=5, help="samples per task and length")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(TASKS))
    parser.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES),
                        help=f"press specs such as snapkv:0.5; '{FULL}' = no press")
    parser.add_argument("--quant", default=None, help="quantization for every config, e.g. int8-int4")
    parser.add_argument("--protocol", choices=("aware", "agnostic"), default="aware",
                        help="aware: generate with the question inside the prompt (the press sees it); agnostic: "
                             "prefill the context, compress it (cache.compress(model)), then ask the question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tag", default=None, help=f"output name suffix (default: {DEFAULT_TAG}[_QUANT])")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--resume", action="store_true", help="keep saved records and skip those runs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the table and plot from the saved JSON (e.g. after stopping a run): the "
                             "--presses / --tasks / --lengths given, else every one it holds")
    args = parser.parse_args(argv)
    if args.n < 1 or args.threads < 1 or args.max_new_tokens < 1 or min(args.lengths) < 1:
        parser.error("--n, --threads, --max-new-tokens and --lengths must be positive")
    for spec in args.presses:
        try:
            resolve_config(press=press_arg(spec), quant=args.quant)
        except ValueError as err:
            parser.error(str(err))
    if len(set(args.presses)) != len(args.presses):
        parser.error("--presses has duplicates")
    if args.tag is None:
        args.tag = DEFAULT_TAG if args.quant is None else f"{DEFAULT_TAG}_{args.quant}"
        if args.protocol == "agnostic":
            args.tag += "_agnostic"
    return args


def press_arg(spec: str) -> str | None:
    """The press spec handed to kvpress (None for the full cache)."""
    return None if spec.strip().lower() in (FULL, "none") else spec


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """JSON/PNG are presses_<tag>.*; the markdown is presses.md for the default tag (presses_<tag>.md otherwise)."""
    stem = f"presses_{args.tag}"
    md = "presses.md" if args.tag == DEFAULT_TAG else f"{stem}.md"
    return {"json": args.out_dir / f"{stem}.json", "md": args.out_dir / md, "png": args.out_dir / f"{stem}.png"}


def run_key(record: dict) -> tuple:
    """(press, length, task, sample index): what identifies one run; without the press, one sample."""
    return record["press"], record["length"], record["task"], record["index"]


def run_one(model, tok, sample: dict, spec: str, args: argparse.Namespace) -> dict:
    """Answer one sample with one press config; failures are recorded (with the error) instead of raised."""
    record = {"press": spec, "quant": args.quant, "length": sample["target_tokens"], "task": sample["task"],
              "index": sample["index"], "answers": sample["answers"], "protocol": args.protocol}
    try:
        if args.protocol == "agnostic":
            report = answer_after_compression(model, tok, sample, spec, args)
        else:
            report = generate_with_report(model, tok, sample["prompt"], press=press_arg(spec), quant=args.quant,
                                          max_new_tokens=args.max_new_tokens,
                                          prefill_chunk_size=args.prefill_chunk_size, show_progress=False)
    except Exception as err:  # a press that crashes must not lose the other runs
        record.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=4))
        return record
    stats = report.stats
    record.update(
        prediction=report.answer, score=score(report.answer, sample["answers"]),
        prompt_tokens=report.prompt_tokens, new_tokens=report.new_tokens,
        prefill_s=report.prefill_s, decode_s=report.decode_s,
        nbytes=stats["nbytes"], fp16_nbytes=stats["fp16_nbytes"], compression=stats["compression"],
        stored_tokens=stats["stored_tokens"], logical_tokens=stats["logical_tokens"],
    )
    return record


@torch.inference_mode()
def answer_after_compression(model, tok, sample: dict, spec: str, args: argparse.Namespace) -> GenerationReport:
    """The query-agnostic protocol (as the kv-press-text-generation pipeline): prefill the chat prompt up to the
    question, compress it before the question is seen, then generate from the question on that cache.
    prefill_s includes the compression (KVzip's context replay)."""
    prompt, question = sample["prompt"], sample["question"]
    if not prompt.endswith(question):
        raise ValueError("the agnostic protocol needs prompts that end with the question")
    context_ids, (tail,) = split_prompt(tok, prompt[: -len(question)].removesuffix("\n\n"), [question])
    cfg = resolve_config(press=press_arg(spec), quant=args.quant)
    start = time.perf_counter()
    cache = compressed_context(model, context_ids.to(model.device), press=cfg.press, quant=cfg.quant,
                               prefill_chunk_size=args.prefill_chunk_size)
    mid = time.perf_counter()
    ids = torch.cat([context_ids, tail], dim=1).to(model.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                         max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    end = time.perf_counter()
    new = out[0, ids.shape[1]:]
    return GenerationReport(answer=tok.decode(new, skip_special_tokens=True).strip(), prompt_tokens=ids.shape[1],
                            new_tokens=int(new.shape[0]), prefill_s=mid - start, decode_s=end - mid,
                            stats=cache.stats())


def aggregate(records: list[dict], presses: list[str], tasks: list[str], lengths: list[int]) -> list[dict]:
    """One row per (press, length) and per press over all lengths ("all"): accuracy per task and overall, mean
    bytes, compression vs fp16, seconds, and the accuracy difference with the full cache on the same samples.
    Only samples that every press config was run on count (a run stopped early compares like with like)."""
    attempted = defaultdict(set)
    for r in records:
        attempted[run_key(r)[1:]].add(r["press"])
    complete = {sample for sample, done in attempted.items() if done >= set(presses)}
    records = [r for r in records if run_key(r)[1:] in complete]
    ok = [r for r in records if "error" not in r]
    lengths = [n for n in lengths if any(r["length"] == n for r in records)]  # drop lengths with no whole sample
    full_scores = {run_key(r)[1:]: r["score"] for r in ok if r["press"] == FULL}
    rows = []
    for press in presses:
        for length in [*lengths, "all"] if len(lengths) > 1 else lengths:
            group = [r for r in ok if r["press"] == press and length in ("all", r["length"])]
            errors = sum(1 for r in records if r["press"] == press and "error" in r
                         and length in ("all", r["length"]))
            row = {"press": press, "length": length, "runs": len(group), "errors": errors}
            if group:
                by_task = defaultdict(list)
                for r in group:
                    by_task[r["task"]].append(r["score"])
                row["accuracy"] = {t: statistics.fmean(by_task[t]) for t in tasks if by_task[t]}
                row["overall"] = statistics.fmean(r["score"] for r in group)
                paired = [(r["score"], full_scores[run_key(r)[1:]]) for r in group if run_key(r)[1:] in full_scores]
                row["delta_vs_full"] = statistics.fmean(a - b for a, b in paired) if paired else None
                for name in ("nbytes", "fp16_nbytes", "compression", "stored_tokens", "prefill_s", "decode_s"):
                    row[name] = statistics.fmean(r[name] for r in group)
            rows.append(row)
    return rows


def markdown(rows: list[dict], tasks: list[str], command: str, args: argparse.Namespace, n_records: int) -> str:
    """The aggregated table, with the exact command that produced it at the top."""
    lines = [
        "# Eviction presses: accuracy vs KV bytes (SmolLM2-135M-Instruct, CPU, fp32)",
        "",
        "```",
        command,
        "```",
        "",
        f"{args.n} samples per task and length, greedy, {args.max_new_tokens} new tokens, quant={args.quant}, "
        f"protocol={getattr(args, 'protocol', 'aware')} (aware: the question is in the prompt the press sees; "
        "agnostic: the context is compressed before the question is seen). "
        "Accuracy = share of expected answers found in the output. KV MiB = bytes the KVPressCache really holds "
        "after generation; vs fp16 = that / what a 16-bit DynamicCache holds for the same tokens. "
        "Δ full = mean paired accuracy difference with the full cache on the same samples (points).",
        *planned_note(args, n_records),
        "",
        "| press | length | " + " | ".join(tasks) + " | overall | Δ full | KV MiB | vs fp16 | stored tok | "
        "prefill s | decode s | runs | errors |",
        "|" + "---|" * (len(tasks) + 11),
    ]
    for row in rows:
        if "overall" not in row:
            lines.append(f"| {row['press']} | {row['length']} |" + " – |" * (len(tasks) + 7)
                         + f" 0 | {row['errors']} |")
            continue
        acc = " | ".join(f"{100 * row['accuracy'][t]:.0f}" if t in row["accuracy"] else "–" for t in tasks)
        delta = "–" if row["delta_vs_full"] is None else f"{100 * row['delta_vs_full']:+.0f}"
        lines.append(
            f"| {row['press']} | {row['length']} | {acc} | {100 * row['overall']:.1f} | {delta} | "
            f"{row['nbytes'] / 2**20:.2f} | {100 * row['compression']:.0f}% | {row['stored_tokens']:.0f} | "
            f"{row['prefill_s']:.2f} | {row['decode_s']:.2f} | {row['runs']} | {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


def planned_note(args: argparse.Namespace, n_records: int) -> list[str]:
    """A warning line when the run was stopped before every planned run was done."""
    planned = len(args.lengths) * len(args.tasks) * args.n * len(args.presses)
    if n_records >= planned:
        return []
    return ["", f"**Partial run: {n_records} of {planned} planned runs were done; the table counts only samples "
            "that every press config saw (see the runs column).**"]


def plot(rows: list[dict], lengths: list[int], path: Path) -> None:
    """Accuracy vs KV bytes (fraction of a 16-bit cache), one line per press across its ratios, 95% intervals: one
    file per context length with results (path, or path_<length>.png when several)."""
    lengths = [n for n in lengths if any(r["length"] == n and "overall" in r for r in rows)] or lengths[:1]
    for length in lengths:
        target = path if len(lengths) == 1 else path.with_name(f"{path.stem}_{length}{path.suffix}")
        plot_accuracy_vs_bytes([r for r in rows if r["length"] == length], target,
                               f"SmolLM2-135M-Instruct, {length} tokens: accuracy vs KV bytes")


def save(records: list[dict], args: argparse.Namespace, command: str, paths: dict[str, Path]) -> list[dict]:
    """Write the JSON (records + aggregates) atomically and return the aggregated rows."""
    rows = aggregate(records, args.presses, args.tasks, args.lengths)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("resume", "report_only")}
    payload = {"command": command, "model": "SmolLM2-135M-Instruct", "config": config,
               "torch": torch.__version__, "aggregate": rows, "records": records}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(paths["json"])
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every (sample, length, task, press), saving after each run; then write the table and the plot."""
    args = parse_args(argv)
    command = "python eval/bench_presses.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(args)
    records: list[dict] = []
    if (args.resume or args.report_only) and paths["json"].is_file():
        saved = json.loads(paths["json"].read_text())
        records = saved["records"] if args.report_only else [r for r in saved["records"] if "error" not in r]
        if args.report_only:  # describe the saved records (several --resume runs may have added to the file)
            given = sys.argv[1:] if argv is None else argv
            command = saved["command"]
            for name in ("n", "quant", "max_new_tokens"):
                setattr(args, name, saved["config"][name])
            args.protocol = next((r["protocol"] for r in records if "protocol" in r), saved["config"].get("protocol"))
            for name, field in (("presses", "press"), ("tasks", "task"), ("lengths", "length")):
                if f"--{name}" not in given:  # not chosen on this command line: every one the file holds
                    setattr(args, name, list(dict.fromkeys(r[field] for r in records)) or saved["config"][name])
    if args.report_only:
        return report(records, args, command, paths)
    done = {run_key(r) for r in records}
    model, tok = kvpress.load_default_model()
    kvpress.wrap(model)
    # Shortest length first, sample-major inside a length: a run stopped early (see --report-only) leaves whole
    # samples that every press saw, and the cheap lengths done.
    samples = {(length, task): make_tasks(task, args.n, length, tokenizer=tok, seed=args.seed)
               for length in args.lengths for task in args.tasks}
    todo = [(samples[length, task][i], spec) for length in sorted(args.lengths) for i in range(args.n)
            for task in args.tasks for spec in args.presses]
    for sample, spec in tqdm(todo, desc="runs", unit="run", dynamic_ncols=True):
        key = (spec, sample["target_tokens"], sample["task"], sample["index"])
        if key in done:
            continue
        record = run_one(model, tok, sample, spec, args)
        records.append(record)
        if "error" in record:
            tqdm.write(f"FAILED {' '.join(map(str, key))}: {record['error']}")
        save(records, args, command, paths)
    return report(records, args, command, paths)


def report(records: list[dict], args: argparse.Namespace, command: str, paths: dict[str, Path]) -> int:
    """Save the JSON with its aggregates, write the markdown table and the plot, print the table."""
    rows = save(records, args, command, paths)
    paths["md"].write_text(markdown(rows, args.tasks, command, args, len(records)))
    if not args.no_plot:
        plot(rows, args.lengths, paths["png"])
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
