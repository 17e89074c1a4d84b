"""What a task family produces before the haystack is fitted around it: insertions, question, answers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Insertion:
    """Text to place in the haystack at relative ``depth`` (0 = start, 1 = end).

    ``standalone`` insertions (such as a JSON block) get a paragraph of their own.
    """

    text: str
    depth: float
    standalone: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if not self.text.strip():
            raise ValueError("insertion text must not be empty")


@dataclass(frozen=True)
class TaskSpec:
    """One sample's content; insertions that share a position keep their list order."""

    insertions: tuple[Insertion, ...]
    question: str
    answers: tuple[str, ...]
    instruction: str

    def __post_init__(self) -> None:
        if not self.answers or any(not a for a in self.answers):
            raise ValueError("a task needs at least one non-empty answer")
        if not self.insertions:
            raise ValueError("a task needs at least one insertion")
        inserted = "\n".join(i.text for i in self.insertions)
        missing = [a for a in self.answers if a not in inserted]
        if missing:
            raise ValueError(f"answers {missing} do not occur in any insertion")
