"""Key-value retrieval: a JSON object of UUID keys and values sits inside the text; ask one key's value."""
from __future__ import annotations

import random

from kvpress.eval.tasks.spec import Insertion, TaskSpec
from kvpress.eval.tasks.vocab import distinct, random_uuid

TOKENS_PER_PAIR_BUDGET = 256
MIN_PAIRS, MAX_PAIRS = 4, 64

INSTRUCTION = (
    "The following text contains a JSON object of key-value pairs. Read it carefully; a question about one"
    " of the keys comes after."
)
QUESTION = 'What is the value of the key "{key}" in the JSON object? Answer with the value only.'


def pair_count(context_tokens: int) -> int:
    """Pairs grow with context length (one per 256 tokens), clamped to [4, 64]."""
    return max(MIN_PAIRS, min(MAX_PAIRS, context_tokens // TOKENS_PER_PAIR_BUDGET))


def render_json_object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object with one ``"key": "value"`` pair per line."""
    body = ",\n".join(f'  "{key}": "{value}"' for key, value in pairs)
    return "JSON data:\n{\n" + body + "\n}"


def build_kv_retrieval(rng: random.Random, context_tokens: int) -> TaskSpec:
    """UUID pairs in one JSON block at a random depth; the asked key is at a random position in the block."""
    count = pair_count(context_tokens)
    uuids = distinct(random_uuid, rng, 2 * count)
    pairs = list(zip(uuids[:count], uuids[count:]))
    asked_key, asked_value = pairs[rng.randrange(count)]
    return TaskSpec(
        insertions=(Insertion(render_json_object(pairs), depth=rng.random(), standalone=True),),
        question=QUESTION.format(key=asked_key),
        answers=(asked_value,),
        instruction=INSTRUCTION,
    )
