"""KVzipPress (context replay) and ExpectedAttentionPress: scores against hand computations, wrap + generate,
cache.compress(model=...), the kv-press pipeline, batch rows equal batch-1 runs, bytes shrink by the ratio."""
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvpress
from kvpress.paged.ragged import PAGE_TOKENS
from kvpress.cache import KVPressCache
from kvpress.hf_compat import cache_kwargs
from kvpress.pipeline import compressed_context
from kvpress.presses import parse_press
from kvpress.presses.expected import ExpectedAttentionPress, ExpectedInputs, mean_rotation, model_rotary, unrotate
from kvpress.presses.kvzip import KVzipPress
from kvpress.presses.replay import REPLAY_ATTENTION, replay_scores
from tests.tiny_models import left_padded_batch, tiny_model

SPECS = ["kvzip:0.5", "kvzip:0.5:chunk_size=7", "expected:0.5"]


def test_registry_strings_parse():
    press = parse_press("kvzip:0.75:chunk_size=256")
    assert isinstance(press, KVzipPress) and press.compression_ratio == 0.75 and press.chunk_size == 256
    press = parse_press("expected:0.5:window=32,n_future=64")
    assert isinstance(press, ExpectedAttentionPress) and (press.window, press.n_future, press.n_sink) == (32, 64, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        parse_press("kvzip:0.5:chunk_size=0")


def test_expected_score_matches_a_hand_computation():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    mean = torch.tensor([[[0.5, -1.0]]])
    cov = torch.tensor([[[[0.3, 0.1], [0.1, 0.2]]]])
    valid = torch.tensor([[True, True, True]])
    s = 0.7
    got = ExpectedAttentionPress(0.5).score(ExpectedInputs(keys, values, valid, s, mean=mean, cov=cov))
    logits = []
    for t in range(3):
        k = keys[0, 0, t]
        logits.append(s * float(mean[0, 0] @ k) + s * s * float(k @ cov[0, 0] @ k) / 2)
    z = sum(math.exp(x) for x in logits)
    want = [math.exp(x) / z * float(values[0, 0, t].norm()) for t, x in enumerate(logits)]
    torch.testing.assert_close(got[0, 0], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_rope_unrotation_and_mean_future_rotation():
    model = tiny_model("llama")
    rotary = model_rotary(model)
    q = torch.randn(2, 4, 3, 16)
    cos, sin = rotary(q, torch.tensor([[3, 4, 5], [7, 8, 9]]))
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(unrotate(rotated, cos, sin), q, rtol=1e-5, atol=1e-5)
    cos_f, sin_f = rotary(q, torch.tensor([[10, 11], [12, 13]]))
    first = q[:, :, :1]
    want = sum(apply_rotary_pos_emb(first, first, cos_f[:, j:j + 1], sin_f[:, j:j + 1])[0] for j in range(2)) / 2
    got = torch.einsum("bij,bhj->bhi", mean_rotation(cos_f, sin_f, 16), first[:, :, 0])
    torch.testing.assert_close(got, want[:, :, 0], rtol=1e-5, atol=1e-5)


def test_kvzip_scores_equal_the_attention_of_a_full_forward_over_context_and_repeat():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    prompt = (5, 6)
    kvpress.wrap(model)
    try:
        cache = KVPressCache(model.config)
        with torch.inference_mode():
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        contexts = {i: layer.stored_kv() for i, layer in enumerate(cache.layers)}
        scores = replay_scores(model, contexts, {0, 1}, ids, [0], prompt, chunk_size=5)
        assert model.config._attn_implementation == "kvpress"
    finally:
        kvpress.unwrap(model)
    full = torch.cat([ids, torch.tensor([prompt]), ids], dim=1)
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        attn = model(input_ids=full, output_attentions=True).attentions  # (1, Hq, L, L) per layer
    model.set_attn_implementation("sdpa")
    for layer, probs in enumerate(attn):
        want = probs[0, :, 12:, :12].amax(dim=1).reshape(2, 2, 12).amax(dim=1)  # max over repeat queries, group
        torch.testing.assert_close(scores[layer][0], want, rtol=1e-4, atol=1e-5)


def test_replay_restores_the_attention_implementation_on_error():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 6))
    contexts = {0: (torch.zeros(1, 2, 6, 16),) * 2 + (torch.ones(1, 6, dtype=torch.bool),)}  # layer 1 missing
    with pytest.raises(KeyError):
        replay_scores(model, contexts, {0}, ids, [0], (), chunk_size=4)
    assert model.config._attn_implementation == "sdpa" != REPLAY_ATTENTION


@pytest.mark.parametrize("spec", SPECS)
def test_batched_rows_equal_batch_one_runs_through_wrap(spec):
    model = kvpress.wrap(tiny_model("llama"), press=spec)
    pads = (0, 5, 2)
    ids, mask = left_padded_batch(length=40, pads=pads)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    stats = kvpress.last_generate_stats(model)
    assert stats["stored_tokens"] < 30  # 40 positions (+5 decoded), half of each row's real tokens kept
    for row, pad in enumerate(pads):
        one = model.generate(input_ids=ids[row:row + 1, pad:], attention_mask=mask[row:row + 1, pad:],
                             max_new_tokens=5, do_sample=False)
        assert torch.equal(one[0, -5:], out[row, -5:])


@pytest.mark.parametrize("spec", ["kvzip:0.5", "kvzip:0.5:budget=uniform", "expected:0.5"])
def test_cache_compress_frees_half_the_bytes(spec):
    model = kvpress.wrap(tiny_model("llama"))
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    full = compressed_context(model, ids)
    half = compressed_context(model, ids, press=spec, prefill_chunk_size=24)
    assert half.stats()["stored_tokens"] == 32
    ratio = half.stats()["nbytes"] / full.stats()["nbytes"]
    if spec == "kvzip:0.5":  # KVzip's default global budget: heads at their own lengths, under a page of slack each
        layers, heads, head_dim = 2, 2, 16
        slack = layers * heads * PAGE_TOKENS * 2 * head_dim * 4 / full.stats()["nbytes"]
        assert 0.49 < ratio < 0.53 + slack
    else:
        assert 0.49 < ratio < 0.53  # scores / statistics: a few %


def test_kvzip_without_a_model_or_ids_refuses_clearly():
    model = kvpress.wrap(tiny_model("llama"))
    cache = KVPressCache(model.config, press="kvzip:0.5")
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 128, (1, 10)), **cache_kwargs(model, cache), use_cache=True)
    with pytest.raises(ValueError, match="model"):
        cache.compress()
    with pytest.raises(ValueError, match="record_prompt_ids"):
        cache.compress(model=model)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["kvzip:0.5", "expected:0.5"])
def test_kv_press_pipeline_answers_with_the_press(spec):
    from transformers import pipeline

    model, tok = kvpress.load_default_model()
    kvpress.wrap(model)
    context = "The vault code is 4417. The garden has 12 roses. Alice was born in Lisbon. " * 3
    qa = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    results = qa(context, questions=["What is the vault code?", "Where was Alice born?"], press=spec,
                 max_new_tokens=8)
    assert len(results) == 2 and all(r["answer"] for r in results)
    kv = results[0]["kv"]
    assert kv["stored_tokens"] <= 0.5 * kv["logical_tokens"] + 1
