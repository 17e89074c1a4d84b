"""Uncompressed kvpress (no press, no quant) must reproduce the plain model exactly on every architecture."""
import pytest
import torch

import kvpress
from tiny_models import left_padded_batch, tiny_configs, tiny_model

ARCHS = list(tiny_configs())


def _generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_wrapped_matches_plain(arch, batch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch(batch=batch, length=20)
    ref = _generate(model, ids, mask)
    kvpress.wrap(model)
    try:
        out = _generate(model, ids, mask)
    finally:
        kvpress.unwrap(model)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_explicit_cache_and_chunked_prefill(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch(batch=3, length=30, pads=(0, 9, 3))
    ref = _generate(model, ids, mask)
    kvpress.wrap(model)
    try:
        cache = kvpress.KVPressCache(model.config)
        explicit = _generate(model, ids, mask, past_key_values=cache)
        chunked = _generate(model, ids, mask, prefill_chunk_size=7)
    finally:
        kvpress.unwrap(model)
    assert torch.equal(ref.sequences, explicit.sequences)
    assert torch.equal(ref.sequences, chunked.sequences)
    assert cache.stats()["logical_tokens"] == 30 + 12 - 1


def test_sampling_matches_plain_with_same_seed():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=2, length=16)
    torch.manual_seed(5)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0)
    kvpress.wrap(model)
    torch.manual_seed(5)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0)
    kvpress.unwrap(model)
    assert torch.equal(ref, out)


def test_beam_search_matches_plain():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch(batch=2, length=16, pads=(0, 4))
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    kvpress.wrap(model)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    kvpress.unwrap(model)
    assert torch.equal(ref, out)


def test_generate_up_to_model_limit():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=1, length=16)
    limit = model.config.max_position_embeddings
    kvpress.wrap(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit - 16, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    kvpress.unwrap(model)
    assert out.shape[1] == limit


def test_wrap_unwrap_round_trip_restores_model():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=2, length=12)
    before = model(input_ids=ids, attention_mask=mask).logits
    impl = model.config._attn_implementation
    kvpress.wrap(model, press=None)
    kvpress.wrap(model)  # wrapping twice replaces the configuration, no double patching
    kvpress.unwrap(model)
    assert model.config._attn_implementation == impl
    assert "generate" not in vars(model)
    assert not kvpress.is_wrapped(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)


def test_wrapped_forward_without_cache_still_works():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=2, length=12)
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kvpress.wrap(model)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kvpress.unwrap(model)
    torch.testing.assert_close(out, ref)
