"""Scoring for generated tasks: the share of expected answers that appear in the model's output."""
from __future__ import annotations


def score(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction``, ignoring case (1.0 = all found)."""
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    if not answers or any(not isinstance(a, str) or not a for a in answers):
        raise ValueError("answers must be a non-empty list of non-empty strings")
    lowered = prediction.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)
