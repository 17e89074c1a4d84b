"""Tests for the task families' content and for placing insertions in the haystack."""
import json
import random
import re

from kvpress.eval.tasks.assemble import render_context
from kvpress.eval.tasks.generator import make_tasks
from kvpress.eval.tasks.kv_retrieval import pair_count
from kvpress.eval.tasks.niah import MULTIKEY_NEEDLES, MULTIVALUE_NEEDLES
from kvpress.eval.tasks.spec import Insertion, TaskSpec
from kvpress.eval.tasks.variable_tracking import CHAIN_HOPS, interleave

NEEDLE = re.compile(r"special magic numbers? for ([a-z]+-[a-z]+)")


def test_niah_single_phrasings_and_depths_vary():
    samples = make_tasks("niah_single", n=12, context_tokens=1024)
    sentences = set()
    for sample in samples:
        (value,) = sample["answers"]
        assert re.fullmatch(r"\d{7}", value)
        key = NEEDLE.search(sample["question"]).group(1)
        needle = next(s for s in re.split(r"(?<=\.)\s+", sample["context"]) if value in s)
        assert key in needle
        sentences.add(needle.replace(key, "KEY").replace(value, "VALUE"))
        assert sample["question"].endswith("Answer with the number only.")
    assert len(sentences) >= 3
    assert len({sample["depths"][0] for sample in samples}) == 12


def test_niah_multikey_has_distinct_keys_and_asks_one():
    for sample in make_tasks("niah_multikey", n=4, context_tokens=2048):
        keys = set(NEEDLE.findall(sample["context"]))
        assert len(keys) == MULTIKEY_NEEDLES
        assert NEEDLE.search(sample["question"]).group(1) in keys
        assert len(re.findall(r"\b\d{7}\b", sample["context"])) == MULTIKEY_NEEDLES
        assert len(sample["answers"]) == 1


def test_niah_multivalue_asks_for_every_value_of_one_key():
    for sample in make_tasks("niah_multivalue", n=4, context_tokens=2048):
        assert len(set(NEEDLE.findall(sample["context"]))) == 1
        assert sorted(re.findall(r"\b\d{7}\b", sample["context"])) == sorted(sample["answers"])
        assert len(sample["answers"]) == MULTIVALUE_NEEDLES


def test_kv_retrieval_block_is_json_and_answer_is_the_asked_keys_value():
    for length in (1024, 4096):
        sample = make_tasks("kv_retrieval", n=1, context_tokens=length)[0]
        block = re.search(r"JSON data:\n(\{.*?\n\})", sample["context"], re.S).group(1)
        pairs = json.loads(block)
        assert len(pairs) == pair_count(length)
        asked = re.search(r'"([0-9a-f-]{36})"', sample["question"]).group(1)
        assert [pairs[asked]] == sample["answers"]
    assert pair_count(100) == 4 and pair_count(10**6) == 64


def test_variable_tracking_chain_is_defined_in_order():
    for sample in make_tasks("variable_tracking", n=4, context_tokens=2048):
        assignments = re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d{5})\.", sample["context"])
        assert len(assignments) == 2 * (CHAIN_HOPS + 1)
        value = re.search(r"value (\d{5})", sample["question"]).group(1)
        equal_to_value = set()
        for name, source in assignments:  # resolve in text order: a reference must already be known
            if source == value or source in equal_to_value:
                equal_to_value.add(name)
        assert equal_to_value == set(sample["answers"])


def test_interleave_keeps_each_sequence_order():
    merged = interleave(random.Random(0), [["a1", "a2", "a3"], ["b1", "b2"]])
    assert sorted(merged) == ["a1", "a2", "a3", "b1", "b2"]
    assert [m for m in merged if m[0] == "a"] == ["a1", "a2", "a3"]
    assert [m for m in merged if m[0] == "b"] == ["b1", "b2"]


def test_insertions_at_same_depth_keep_list_order_and_blocks_stand_alone():
    spec = TaskSpec(
        insertions=(Insertion("FIRST 1.", 0.5), Insertion("SECOND 2.", 0.5), Insertion("BLOCK 3", 1.0, True)),
        question="q?", answers=("1", "2", "3"), instruction="i",
    )
    context = render_context(spec, start=0, sentence_count=10)
    assert context.index("FIRST 1.") < context.index("SECOND 2.")
    assert context.endswith("\n\nBLOCK 3")
    assert render_context(spec, 0, 0) == "FIRST 1. SECOND 2.\n\nBLOCK 3"
