"""The lm-eval task functions in kvpress/eval/lm_eval_tasks/utils.py: lengths and sample counts from metadata, the
model's tokenizer (or the approximate counter) for sizing, and the fraction-of-answers metric."""
from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from kvpress.eval.lm_eval_tasks import utils  # noqa: E402


def test_dataset_sized_by_default_tokenizer_for_each_length():
    data = utils.niah_multikey(max_seq_lengths=[256, 384], num_samples=2, pretrained="default", press="snapkv:0.5",
                               version=1.0)
    rows = list(data["test"])
    assert [r["target_tokens"] for r in rows] == [256, 256, 384, 384]
    tok = utils.resolve_tokenizer({"pretrained": "default"})
    for row in rows:
        exact = len(tok(row["prompt"]).input_ids)
        assert exact == row["length_tokens"] <= row["target_tokens"]
        assert exact > 0.8 * row["target_tokens"]
        assert row["task"] == "niah_multikey" and row["answers"]


def test_defaults_and_approximate_fallback(caplog):
    data = utils.kv_retrieval(num_samples=1, pretrained="/nonexistent/model")
    assert [r["target_tokens"] for r in data["test"]] == [2048, 4096]
    assert "sizing prompts approximately" in caplog.text


def test_explicit_tokenizer_must_load():
    with pytest.raises((OSError, ValueError)):
        utils.niah_single(num_samples=1, max_seq_lengths=[256], tokenizer="/nonexistent/tokenizer")


@pytest.mark.parametrize(
    ("metadata", "key"),
    [({"max_seq_lengths": [0]}, "max_seq_lengths"), ({"max_seq_lengths": []}, "max_seq_lengths"),
     ({"max_seq_lengths": ["4k"]}, "max_seq_lengths"), ({"num_samples": 1.5}, "num_samples"),
     ({"num_samples": True}, "num_samples"), ({"seed": "x"}, "seed")],
)
def test_bad_metadata_is_rejected(metadata, key):
    with pytest.raises(ValueError, match=key):
        utils.variable_tracking(**metadata)


def test_score_is_fraction_of_answers_found():
    doc = {"answers": ["1234567", "7654321"]}
    assert utils.process_results(doc, ["It is 1234567."]) == {"score": 0.5}
    assert utils.process_results(doc, ["7654321, 1234567"]) == {"score": 1.0}
    assert utils.process_results(doc, ["no idea"]) == {"score": 0.0}
