"""`make demo`: one long-context question answered with the full cache and compressed caches, side by side."""
from __future__ import annotations

from .runner import generate_with_report

DEFAULT_CONFIGS = ["none", "snapkv:0.5", "none,int8-int4", "snapkv:0.5,int8-int4", "h2o:0.75,int8-int4"]


def parse_pair(text: str) -> tuple[str | None, str | None]:
    """'press[,quant]' -> (press, quant); 'none' means no press."""
    press, _, quant = text.partition(",")
    press = None if press.strip().lower() in ("", "none", "full") else press.strip()
    return press, (quant.strip() or None)


def run_demo(model_name: str = "default", configs: list[str] | None = None, tokens: int = 3000,
             max_new_tokens: int = 24) -> list[dict]:
    """Print answers, KV bytes and timings per configuration; returns the rows."""
    from .api import wrap
    from .default_model import load_model
    from .eval.tasks.generator import make_tasks, score

    pairs = [parse_pair(c) for c in (configs or DEFAULT_CONFIGS)]
    from .config import resolve_config

    for press, quant in pairs:
        resolve_config(press=press, quant=quant)  # fail on a typo before loading anything
    model, tok = load_model(model_name)
    wrap(model)
    task = make_tasks("niah_single", n=1, context_tokens=tokens, tokenizer=tok, seed=7)[0]
    print(f"document: {task['length_tokens']} tokens of Python reference prose with one hidden fact")
    print(f"question: {task['question']}\nexpected: {', '.join(task['answers'])}\n")
    rows = []
    for press, quant in pairs:
        report = generate_with_report(model, tok, task["prompt"], press=press, quant=quant,
                                      max_new_tokens=max_new_tokens)
        label = f"{press or 'full cache'}{' + ' + quant if quant else ''}"
        ok = score(report.answer, task["answers"]) == 1.0
        print(f"[{label}] {'correct' if ok else 'wrong'}: {report.answer[:100]!r}")
        print(f"    {report.summary()}")
        rows.append({"config": label, "correct": ok, "answer": report.answer, **report.stats,
                     "prefill_s": report.prefill_s, "first_step_s": report.first_step_s,
                     "decode_tok_s": report.decode_tokens_per_s})
    return rows
