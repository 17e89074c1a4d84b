"""Fit real-text haystack around a task's insertions so the whole prompt hits a token budget."""
from __future__ import annotations

from dataclasses import dataclass

from kvpress.eval.tasks.haystack import read_window
from kvpress.eval.tasks.spec import TaskSpec
from kvpress.eval.tasks.tokens import TokenCounter

_FIRST_GUESS_TOKENS_PER_SENTENCE = 32


@dataclass(frozen=True)
class _Unit:
    """A rendered piece of the context: a haystack sentence or an insertion."""

    text: str
    ends_paragraph: bool = False
    standalone: bool = False


def render_context(spec: TaskSpec, start: int, sentence_count: int) -> str:
    """Haystack of ``sentence_count`` corpus sentences from ``start`` with the insertions at their depths."""
    units = [_Unit(s.text, s.ends_paragraph) for s in read_window(start, sentence_count)]
    placed = [(round(ins.depth * sentence_count), order, ins) for order, ins in enumerate(spec.insertions)]
    # Insert back to front so earlier positions stay valid and tied insertions end up in list order.
    for position, _, ins in sorted(placed, key=lambda p: (p[0], p[1]), reverse=True):
        units.insert(position, _Unit(ins.text, standalone=ins.standalone))
    return _join(units)


def _join(units: list[_Unit]) -> str:
    """Join units with a space inside paragraphs and a blank line around paragraph ends and standalone blocks."""
    pieces: list[str] = []
    for i, unit in enumerate(units):
        pieces.append(unit.text)
        if i + 1 < len(units):
            following = units[i + 1]
            breaks = unit.ends_paragraph or unit.standalone or following.standalone
            pieces.append("\n\n" if breaks else " ")
    return "".join(pieces)


def format_prompt(spec: TaskSpec, context: str) -> str:
    """Plain-text prompt: instruction, the context, then the question last (easiest for small models)."""
    return f"{spec.instruction}\n\n{context}\n\n{spec.question}"


def fit_sample(spec: TaskSpec, start: int, target_tokens: int, count_tokens: TokenCounter) -> dict:
    """Largest haystack whose prompt stays within ``target_tokens``; returns context, prompt and length."""
    def prompt_for(sentence_count: int) -> str:
        return format_prompt(spec, render_context(spec, start, sentence_count))

    if count_tokens(prompt_for(0)) > target_tokens:
        raise ValueError(f"context_tokens={target_tokens} is too small for this task's question and insertions")
    fits, too_long = 0, max(1, target_tokens // _FIRST_GUESS_TOKENS_PER_SENTENCE)
    while count_tokens(prompt_for(too_long)) <= target_tokens:
        fits, too_long = too_long, too_long * 2
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if count_tokens(prompt_for(middle)) <= target_tokens:
            fits = middle
        else:
            too_long = middle
    context = render_context(spec, start, fits)
    prompt = format_prompt(spec, context)
    return {"context": context, "prompt": prompt, "length_tokens": count_tokens(prompt)}
