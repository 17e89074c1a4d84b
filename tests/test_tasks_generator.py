"""Tests for kvpress.eval.tasks.generator: determinism, answers in context, length fitting, CLI and scoring."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvpress.eval.tasks.generator import TASKS, main, make_tasks, score
from kvpress.eval.tasks.tokens import approximate_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_KEYS = {"task", "context", "question", "answers", "prompt", "length_tokens"}


class WhitespaceTokenizer:
    """Stand-in for a HF tokenizer: one token per whitespace-separated word."""

    def __call__(self, text):
        return SimpleNamespace(input_ids=text.split())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_family_puts_answers_in_context_at_requested_length(task):
    samples = make_tasks(task, n=2, context_tokens=2048, tokenizer=WhitespaceTokenizer(), seed=3)
    assert len(samples) == 2
    for sample in samples:
        assert EXPECTED_KEYS <= set(sample)
        assert sample["task"] == task
        assert sample["answers"] and all(answer in sample["context"] for answer in sample["answers"])
        assert sample["length_tokens"] == len(sample["prompt"].split())
        assert 0.9 * 2048 <= sample["length_tokens"] <= 2048
        # the question comes after the whole context, so a small model reads it last
        assert sample["prompt"].index(sample["context"]) + len(sample["context"]) < sample["prompt"].index(
            sample["question"])


def test_same_seed_same_output_other_seed_differs():
    first = make_tasks("niah_multikey", n=3, context_tokens=1024, seed=7)
    again = make_tasks("niah_multikey", n=3, context_tokens=1024, seed=7)
    other = make_tasks("niah_multikey", n=3, context_tokens=1024, seed=8)
    assert first == again
    assert [s["answers"] for s in first] != [s["answers"] for s in other]
    assert [s["context"] for s in first] != [s["context"] for s in other]


def test_samples_within_a_batch_differ_and_do_not_depend_on_n():
    three = make_tasks("niah_single", n=3, context_tokens=1024, seed=0)
    assert make_tasks("niah_single", n=2, context_tokens=1024, seed=0) == three[:2]
    assert len({s["answers"][0] for s in three}) == 3
    assert len({s["context"] for s in three}) == 3


def test_without_tokenizer_lengths_use_word_estimate():
    for length in (2048, 4096):
        for sample in make_tasks("kv_retrieval", n=2, context_tokens=length, seed=1):
            assert sample["length_tokens"] == approximate_tokens(sample["prompt"])
            assert 0.9 * length <= sample["length_tokens"] <= length


def test_long_context_beyond_one_pass_of_corpus_still_fits():
    sample = make_tasks("niah_single", n=1, context_tokens=60_000, tokenizer=WhitespaceTokenizer())[0]
    assert 0.9 * 60_000 <= sample["length_tokens"] <= 60_000
    assert sample["answers"][0] in sample["context"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "nope", "n": 1, "context_tokens": 1024},
        {"task": "niah_single", "n": 0, "context_tokens": 1024},
        {"task": "niah_single", "n": 1, "context_tokens": 0},
        {"task": "niah_single", "n": 1, "context_tokens": 20},
        {"task": "niah_single", "n": 1, "context_tokens": 1024, "tokenizer": "not callable"},
    ],
)
def test_bad_input_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        make_tasks(**kwargs)


def test_cli_writes_jsonl_for_all_tasks(tmp_path):
    out = tmp_path / "sub" / "tasks.jsonl"
    assert main(["--task", "all", "--n", "2", "--tokens", "1024", "2048", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * 2 * len(TASKS)
    assert {row["task"] for row in rows} == set(TASKS)
    assert {row["target_tokens"] for row in rows} == {1024, 2048}
    assert all(EXPECTED_KEYS <= set(row) for row in rows)


def test_cli_as_module_from_another_directory(tmp_path):
    out = tmp_path / "one.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "kvpress.eval.tasks.generator", "--task", "niah_single", "--n", "1", "--tokens",
               "512", "--out", str(out)]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["task"] == "niah_single" and row["answers"][0] in row["context"]


def test_score_counts_contained_answers_case_insensitively():
    assert score("The number is 1234567.", ["1234567"]) == 1.0
    assert score("no idea", ["1234567"]) == 0.0
    assert score("abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO", "PQRST"]) == 0.5
    with pytest.raises(ValueError):
        score("anything", [])
    with pytest.raises(ValueError):
        score(None, ["1"])
