"""Command line: `python -m kvpress generate ...` and `python -m kvpress demo`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .api import check_model, wrap
from .config import resolve_config


def _load(model_name: str):
    from .default_model import load_model

    model, tok = load_model(model_name)
    check_model(model)
    return wrap(model), tok


def cmd_generate(args: argparse.Namespace) -> int:
    from .runner import generate_with_report

    resolve_config(press=args.press, quant=args.quant)  # bad specs fail before the model loads
    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise SystemExit(f"error: --prompt-file {prompt_path} does not exist")
    prompt = prompt_path.read_text()
    if args.question:
        prompt = f"{prompt}\n\n{args.question}"
    model, tok = _load(args.model)
    report = generate_with_report(model, tok, prompt, press=args.press, quant=args.quant,
                                  max_new_tokens=args.max_new_tokens, prefill_chunk_size=args.prefill_chunk_size)
    print(report.answer)
    print(report.summary(), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, configs=args.config, tokens=args.tokens, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer a prompt file through a compressed KV cache")
    gen.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model path")
    gen.add_argument("--prompt-file", required=True)
    gen.add_argument("--question", default=None, help="appended after the prompt file's text")
    gen.add_argument("--press", default=None, help="e.g. snapkv:0.5, h2o:0.75, streaming:0.5, knorm:0.5")
    gen.add_argument("--quant", default=None, help="e.g. int8-int4, int8, int4")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--prefill-chunk-size", type=int, default=None,
                     help="prefill in chunks of this many tokens (default: the whole prompt at once, fastest on CPU)")
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="a long-context question with the full and compressed caches side by side")
    demo.add_argument("--model", default="default")
    demo.add_argument("--tokens", type=int, default=3000, help="document length in tokens")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--config", action="append", default=None,
                      help="press[,quant] to compare, e.g. 'snapkv:0.5,int8-int4' (repeatable)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
