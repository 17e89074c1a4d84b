"""Tests for the haystack: prose extraction from Python's documentation and wrap-around reading."""
import re

import pytest

from kvpress.eval.tasks.haystack import clean_paragraphs, corpus_sentences, paragraph_starts, read_window, split_sentences

RAW_TOPIC = """The "while" statement
*********************

The "while" statement is used for repeated execution as long as an
expression is true, and it is one of the *compound* statements of the
language with a built-
in meaning:

   while_stmt ::= "while" assignment_expression ":" suite

   for i in range(10):
       print(i)

* A bullet item that explains something in plain words and wraps onto
  a second line before it ends.

Too short to keep.
"""


def test_clean_paragraphs_keeps_prose_and_drops_code_grammar_headings():
    assert clean_paragraphs(RAW_TOPIC) == [
        "A bullet item that explains something in plain words and wraps onto a second line before it ends.",
    ]
    prose = 'It is one of the *compound* statements, with a\nbuilt-\nin meaning that "10**2" keeps [1].'
    assert clean_paragraphs(prose) == [
        'It is one of the compound statements, with a built-in meaning that "10**2" keeps.'
    ]


def test_split_sentences_on_capitalised_starts_only():
    assert split_sentences('One here. "Two" there! e.g. not split... "lower" too. Three?') == [
        "One here.", '"Two" there! e.g. not split... "lower" too.', "Three?"]


def test_corpus_is_large_clean_prose():
    sentences = corpus_sentences()
    words = sum(len(s.text.split()) for s in sentences)
    assert words > 20_000
    text = " ".join(s.text for s in sentences)
    assert not re.search(r"\d{5,}", text)
    assert "magic number" not in text.lower() and "::=" not in text and ">>>" not in text
    assert all(s.text[-1] in '.?!")' for s in sentences)
    assert any(s.ends_paragraph for s in sentences)


def test_read_window_wraps_around_and_paragraph_starts_follow_breaks():
    corpus = corpus_sentences()
    window = read_window(len(corpus) - 2, 5)
    assert window == [corpus[-2], corpus[-1], corpus[0], corpus[1], corpus[2]]
    assert read_window(0, 0) == []
    with pytest.raises(ValueError):
        read_window(0, -1)
    starts = paragraph_starts()
    assert 0 in starts and all(corpus[i - 1].ends_paragraph for i in starts)
