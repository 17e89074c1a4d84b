"""Token counting for length targets: the model's tokenizer when given, else a words * 1.3 estimate."""
from __future__ import annotations

import math
from typing import Any, Callable

WORDS_TO_TOKENS = 1.3

TokenCounter = Callable[[str], int]


def approximate_tokens(text: str) -> int:
    """Rough token count for English prose when no tokenizer is available."""
    return math.ceil(len(text.split()) * WORDS_TO_TOKENS)


def make_token_counter(tokenizer: Any = None) -> TokenCounter:
    """Counter using ``len(tokenizer(text).input_ids)`` (any HF-style tokenizer), or the estimate for None."""
    if tokenizer is None:
        return approximate_tokens
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be callable like a Hugging Face tokenizer, got {type(tokenizer).__name__}")

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    return count
