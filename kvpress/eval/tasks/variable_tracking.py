"""Variable tracking: chains ``VAR A = 12345`` then ``VAR B = A`` ... spread through the text; ask who equals a value.

A second, distractor chain with another value is interleaved so the model must follow references.
"""
from __future__ import annotations

import random

from kvpress.eval.tasks.spec import Insertion, TaskSpec
from kvpress.eval.tasks.vocab import distinct, five_digit_number, variable_name

CHAIN_HOPS = 4
CHAIN_COUNT = 2

INSTRUCTION = (
    "The following text contains variable assignments that start with VAR. Read it carefully; a question about"
    " them comes after."
)
QUESTION = (
    "Which variables are assigned the value {value}, either directly or through other variables? Answer with"
    " all of the variable names, separated by commas."
)


def chain_statements(names: list[str], value: str) -> list[str]:
    """``VAR n0 = value.`` followed by ``VAR n_i = n_{i-1}.`` for each later name."""
    first = [f"VAR {names[0]} = {value}."]
    return first + [f"VAR {name} = {previous}." for previous, name in zip(names, names[1:])]


def interleave(rng: random.Random, sequences: list[list[str]]) -> list[str]:
    """Random merge of several sequences that keeps each sequence's own order."""
    remaining = [list(seq) for seq in sequences if seq]
    merged: list[str] = []
    while remaining:
        weights = [len(seq) for seq in remaining]
        chosen = rng.choices(range(len(remaining)), weights=weights)[0]
        merged.append(remaining[chosen].pop(0))
        remaining = [seq for seq in remaining if seq]
    return merged


def build_variable_tracking(rng: random.Random, context_tokens: int) -> TaskSpec:
    """Two interleaved assignment chains at sorted random depths; the answer is every name in the first chain."""
    per_chain = CHAIN_HOPS + 1
    names = distinct(variable_name, rng, CHAIN_COUNT * per_chain)
    values = distinct(five_digit_number, rng, CHAIN_COUNT)
    chains = [names[i * per_chain:(i + 1) * per_chain] for i in range(CHAIN_COUNT)]
    statements = interleave(rng, [chain_statements(chain, value) for chain, value in zip(chains, values)])
    depths = sorted(rng.random() for _ in statements)
    return TaskSpec(
        insertions=tuple(Insertion(text, depth) for text, depth in zip(statements, depths)),
        question=QUESTION.format(value=values[0]),
        answers=tuple(chains[0]),
        instruction=INSTRUCTION,
    )
