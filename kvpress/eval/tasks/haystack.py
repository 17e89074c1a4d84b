"""Haystack text source: Python's reference documentation (stdlib ``pydoc_data``) cleaned into prose.

``pydoc_data.topics`` ships with every CPython install, so tasks are built offline from real English
text instead of a repeated filler sentence. Code samples, grammar rules and headings are dropped.
"""
from __future__ import annotations

import functools
import re
import textwrap
from dataclasses import dataclass

MIN_PARAGRAPH_WORDS = 12
MAX_SENTENCE_WORDS = 70
_CODE_CHARS = set("{}[]()=<>_\\|`~^@#$%&")
_CODE_CHAR_RATIO = 0.04
_UNICODE_TO_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                                   "\u2013": "-", "\u2014": "-", "\u2026": "..."})
_EMPHASIS = re.compile(r"(?<![\w*])\*([A-Za-z_][^*]*?)\*(?![\w*])")
_STRONG = re.compile(r"\*\*([A-Za-z][^*]*?)\*\*")
_FOOTNOTE = re.compile(r"\s\[\d+\]")
_LONG_NUMBER = re.compile(r"\d{5,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
_HEADING_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")
_BULLETS = ("* ", "+ ", "- ")
_SENTENCE_ENDINGS = (".", "?", "!", '."', ".)")


@dataclass(frozen=True)
class Sentence:
    """One haystack sentence; ``ends_paragraph`` tells the renderer to put a blank line after it."""

    text: str
    ends_paragraph: bool


def _as_flush_lines(block: str) -> list[str] | None:
    """Dedent a block (and unwrap one bullet item); None when lines stay indented, as code and nested lists do."""
    lines = textwrap.dedent(block).split("\n")
    if lines[0][:2] in _BULLETS:
        lines = [lines[0][2:]] + [line[2:] if line.startswith("  ") else line for line in lines[1:]]
    if any(line[:1].isspace() for line in lines):
        return None
    return lines


def _join_wrapped(lines: list[str]) -> str:
    """Join wrapped lines; a line ending in a letter plus hyphen was broken inside a hyphenated word."""
    text = lines[0]
    for line in lines[1:]:
        glue = "" if re.search(r"[A-Za-z]-$", text) else " "
        text = f"{text}{glue}{line}"
    return text


def _looks_like_prose(text: str) -> bool:
    """True for running English text: ends like a sentence, long enough, few code characters, no numbers."""
    if not text.endswith(_SENTENCE_ENDINGS) or len(text.split()) < MIN_PARAGRAPH_WORDS:
        return False
    if "::=" in text or ">>>" in text or "magic number" in text.lower() or _LONG_NUMBER.search(text):
        return False
    return sum(ch in _CODE_CHARS for ch in text) / len(text) <= _CODE_CHAR_RATIO


def _normalise(text: str) -> str:
    """Collapse whitespace, strip reST emphasis stars and footnote marks, map typographic quotes to ASCII."""
    text = _STRONG.sub(r"\1", text.translate(_UNICODE_TO_ASCII))
    text = _FOOTNOTE.sub("", _EMPHASIS.sub(r"\1", text))
    return " ".join(text.split())


def clean_paragraphs(raw: str) -> list[str]:
    """Split one documentation topic into blank-line separated blocks and keep only prose paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw.strip("\n")):
        lines = _as_flush_lines("\n".join(line.rstrip() for line in block.split("\n") if line.strip()))
        if lines is None or _HEADING_UNDERLINE.match(lines[-1]):
            continue
        text = _normalise(_join_wrapped(lines))
        if _looks_like_prose(text):
            paragraphs.append(text)
    return paragraphs


def split_sentences(paragraph: str) -> list[str]:
    """Split a prose paragraph into sentences on terminal punctuation followed by a capital or quote."""
    return [part.strip() for part in _SENTENCE_END.split(paragraph) if part.strip()]


@functools.lru_cache(maxsize=1)
def corpus_sentences() -> tuple[Sentence, ...]:
    """All haystack sentences in a fixed order (topics sorted by name); computed once, on first use."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds may omit it
        raise RuntimeError("the haystack needs the stdlib module pydoc_data.topics, which is missing") from exc
    sentences: list[Sentence] = []
    for name in sorted(topics):
        for paragraph in clean_paragraphs(topics[name]):
            kept = [s for s in split_sentences(paragraph) if len(s.split()) <= MAX_SENTENCE_WORDS]
            sentences.extend(Sentence(s, ends_paragraph=i == len(kept) - 1) for i, s in enumerate(kept))
    if not sentences:
        raise RuntimeError("pydoc_data.topics yielded no prose sentences")
    return tuple(sentences)


@functools.lru_cache(maxsize=1)
def corpus_words() -> frozenset[str]:
    """Every whitespace-separated word of the haystack, stripped of punctuation, for collision checks."""
    return frozenset(word.strip(".,;:!?\"'()") for s in corpus_sentences() for word in s.text.split())


def read_window(start: int, count: int) -> list[Sentence]:
    """``count`` consecutive corpus sentences from ``start``, wrapping around so any length is available."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    corpus = corpus_sentences()
    return [corpus[(start + i) % len(corpus)] for i in range(count)]


@functools.lru_cache(maxsize=1)
def paragraph_starts() -> tuple[int, ...]:
    """Indices of corpus sentences that open a paragraph: natural places for a haystack to begin."""
    corpus = corpus_sentences()
    return tuple(i for i in range(len(corpus)) if corpus[i - 1].ends_paragraph)
