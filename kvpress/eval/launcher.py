"""`kvpress-lm-eval` / `python -m kvpress.eval.launcher`: lm-eval's own CLI with kvpress plugged in.

It registers the "kvpress" model type, adds `--include_path` pointing at the offline long-context tasks shipped in
kvpress/eval/lm_eval_tasks (unless the user passes an `--include_path` of their own), then hands every argument to
lm-eval's CLI unchanged. Data parallelism works as lm-eval documents it:
`accelerate launch -m kvpress.eval.launcher --model kvpress --model_args pretrained=...,press=snapkv:0.5 ...`.
"""
from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
_SUBCOMMANDS_WITH_INCLUDE_PATH = ("run", "ls", "validate")
_HELP = ("-h", "--help")


def with_include_path(args: list[str]) -> list[str]:
    """Append `--include_path TASKS_DIR` unless the user gave one or only asked for the top-level help."""
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in args):
        return list(args)
    if not args or (len(args) == 1 and args[0] in _HELP):
        return list(args)
    first = args[0]
    if first.startswith("-") or first in _SUBCOMMANDS_WITH_INCLUDE_PATH:
        return [*args, "--include_path", str(TASKS_DIR)]
    return list(args)


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI (`lm-eval run ...`, or the legacy flag form) with the kvpress model and tasks available."""
    import kvpress.eval.lm_eval_model  # noqa: F401  (registers --model kvpress)
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "kvpress-lm-eval", *with_include_path(args)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
