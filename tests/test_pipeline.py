"""transformers pipelines: per-call press on text-generation, and the compress-once kv-press pipeline."""
import pytest
from transformers import pipeline

import kvpress

pytestmark = pytest.mark.slow

CONTEXT = ("The vault code is 4417. The garden has 12 roses. Alice was born in Lisbon. "
           "The meeting moved to Thursday. The red car belongs to Omar. ") * 4
QUESTIONS = ["What is the vault code?", "Where was Alice born?", "Who owns the red car?"]


@pytest.fixture(scope="module")
def wrapped():
    model, tok = kvpress.load_default_model()
    kvpress.wrap(model)
    yield model, tok
    kvpress.unwrap(model)


def test_text_generation_pipeline_takes_a_per_call_press(wrapped):
    model, tok = wrapped
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    messages = [{"role": "user", "content": CONTEXT + "\nWhat is the vault code?"}]
    pipe(messages, max_new_tokens=4, do_sample=False)
    full = kvpress.last_generate_stats(model)
    pipe(messages, max_new_tokens=4, do_sample=False, press=kvpress.SnapKVPress(compression_ratio=0.5, window_size=16))
    pressed = kvpress.last_generate_stats(model)
    pipe(messages, max_new_tokens=4, do_sample=False, press="knorm:0.75", quant="int8-int4")
    both = kvpress.last_generate_stats(model)
    assert pressed["stored_tokens"] < 0.6 * full["stored_tokens"]
    assert both["nbytes"] < pressed["nbytes"] < full["nbytes"]
    with pytest.raises(ValueError, match="snapkv"):
        pipe(messages, max_new_tokens=2, press="snapkvv:0.5")


def test_kv_press_pipeline_prefills_the_context_once(wrapped):
    model, tok = wrapped
    qa = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    lengths = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[-1]))
    try:
        results = qa(CONTEXT, questions=QUESTIONS, max_new_tokens=12)
    finally:
        hook.remove()
    context_len = results[0]["kv"]["logical_tokens"]
    assert len(results) == 3
    assert sum(1 for n in lengths if n >= context_len) == 1  # one context prefill for three questions
    # Without a press the answers are those of the ordinary pipeline on the full prompt.
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    for result, question in zip(results, QUESTIONS):
        ref = pipe([{"role": "user", "content": f"{CONTEXT}\n\n{question}"}], max_new_tokens=12, do_sample=False)
        assert result["answer"] == ref[0]["generated_text"][-1]["content"].strip()
    assert "4417" in results[0]["answer"]


def test_kv_press_pipeline_compresses_before_the_questions(wrapped):
    model, tok = wrapped
    qa = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    results = qa(CONTEXT, question="What is the vault code?", press="snapkv:0.5:window_size=16", max_new_tokens=8)
    stats = results[0]["kv"]
    assert stats["stored_tokens"] <= 0.55 * stats["logical_tokens"]
    with pytest.raises(ValueError, match="question"):
        qa(CONTEXT)
