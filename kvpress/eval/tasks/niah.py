"""Needle-in-a-haystack families: one needle, several keys (ask one), one key with several values (ask all)."""
from __future__ import annotations

import random

from kvpress.eval.tasks.spec import Insertion, TaskSpec
from kvpress.eval.tasks.vocab import distinct, seven_digit_number, word_key

MULTIKEY_NEEDLES = 4
MULTIVALUE_NEEDLES = 4

SINGLE_NEEDLE_TEMPLATES = (
    "The special magic number for {key} is {value}.",
    "Remember that the special magic number for {key} is {value}.",
    "Keep in mind that the special magic number for {key} is {value}.",
    "For the record, the special magic number for {key} is {value}.",
    "It is worth noting that the special magic number for {key} is {value}.",
    "Somebody wrote down that the special magic number for {key} is {value}.",
)
MULTIVALUE_NEEDLE_TEMPLATES = (
    "One of the special magic numbers for {key} is {value}.",
    "A special magic number for {key} is {value}.",
    "Note that {value} is one of the special magic numbers for {key}.",
)
SINGLE_QUESTION = "What is the special magic number for {key}? Answer with the number only."
MULTIVALUE_QUESTION = (
    "What are all the special magic numbers for {key}? Answer with every one of the numbers, separated by commas."
)
ONE_NEEDLE_INSTRUCTION = (
    "A special magic number is hidden in the following text. Read it carefully; a question about it comes after."
)
MANY_NEEDLES_INSTRUCTION = (
    "Several special magic numbers are hidden in the following text. Read it carefully; a question about them"
    " comes after."
)


def _needles(rng: random.Random, keys: list[str], values: list[str], templates: tuple[str, ...]) -> tuple:
    """One insertion per (key, value) pair, each with a random phrasing and an independent random depth."""
    return tuple(
        Insertion(rng.choice(templates).format(key=key, value=value), depth=rng.random())
        for key, value in zip(keys, values)
    )


def build_niah_single(rng: random.Random, context_tokens: int) -> TaskSpec:
    """One needle ``special magic number for <key> is <7 digits>`` at a random depth; ask for the number."""
    key, value = word_key(rng), seven_digit_number(rng)
    return TaskSpec(
        insertions=_needles(rng, [key], [value], SINGLE_NEEDLE_TEMPLATES),
        question=SINGLE_QUESTION.format(key=key),
        answers=(value,),
        instruction=ONE_NEEDLE_INSTRUCTION,
    )


def build_niah_multikey(rng: random.Random, context_tokens: int) -> TaskSpec:
    """Several needles with different keys and numbers; ask for the number of one of them."""
    keys = distinct(word_key, rng, MULTIKEY_NEEDLES)
    values = distinct(seven_digit_number, rng, MULTIKEY_NEEDLES)
    asked = rng.randrange(MULTIKEY_NEEDLES)
    return TaskSpec(
        insertions=_needles(rng, keys, values, SINGLE_NEEDLE_TEMPLATES),
        question=SINGLE_QUESTION.format(key=keys[asked]),
        answers=(values[asked],),
        instruction=MANY_NEEDLES_INSTRUCTION,
    )


def build_niah_multivalue(rng: random.Random, context_tokens: int) -> TaskSpec:
    """One key with several numbers spread through the text; ask for all of them."""
    key = word_key(rng)
    values = distinct(seven_digit_number, rng, MULTIVALUE_NEEDLES)
    return TaskSpec(
        insertions=_needles(rng, [key] * MULTIVALUE_NEEDLES, values, MULTIVALUE_NEEDLE_TEMPLATES),
        question=MULTIVALUE_QUESTION.format(key=key),
        answers=tuple(values),
        instruction=MANY_NEEDLES_INSTRUCTION,
    )
