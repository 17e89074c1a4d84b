"""Presses inside the cache: real memory freed, budgets, per-row equality, H2O bound and mass, chunked prefill."""
import math

import pytest
import torch

import kvpress
from kvpress.presses import H2OPress, KnormPress, SnapKVPress, StreamingLLMPress
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def _presses(ratio):
    return [SnapKVPress(compression_ratio=ratio, window_size=8, kernel_size=3), H2OPress(compression_ratio=ratio, recent=4),
            StreamingLLMPress(compression_ratio=ratio), KnormPress(compression_ratio=ratio)]


@pytest.mark.parametrize("press", _presses(0.0), ids=lambda p: type(p).__name__)
def test_ratio_zero_reproduces_uncompressed_outputs(press):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=2, length=30, pads=(0, 6))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN)
    kvpress.wrap(model, press=press)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_eviction_frees_memory_in_proportion(ratio):
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=40, pads=(0,))
    full = kvpress.KVPressCache(model.config)
    pressed = kvpress.KVPressCache(model.config, press=KnormPress(compression_ratio=ratio))
    with torch.no_grad():
        for cache in (full, pressed):
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    pressed.compress()
    kept = math.ceil((1 - ratio) * 40)
    assert pressed.stats()["stored_tokens_per_layer"] == [kept, kept]
    assert pressed.stats()["nbytes"] == full.stats()["nbytes"] * kept // 40


def test_sinks_and_recent_window_are_kept():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=40, pads=(0,))
    press = KnormPress(compression_ratio=0.75, n_sink=2, recent=5)
    cache = kvpress.KVPressCache(model.config, press=press)
    keys_before = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    keys_before = [layer.keys.clone() for layer in cache.layers]
    cache.compress()
    for layer, before in zip(cache.layers, keys_before):
        kept = layer.keys
        assert torch.equal(kept[:, :, :2], before[:, :, :2])
        assert torch.equal(kept[:, :, -5:], before[:, :, -5:])


@pytest.mark.parametrize("press", _presses(0.5), ids=lambda p: type(p).__name__)
def test_batched_left_padded_equals_per_row(press):
    model = kvpress.wrap(tiny_model("qwen2"), press=press)
    ids, mask = left_padded_batch(batch=3, length=36, pads=(0, 9, 4))
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN)
    for row in range(3):
        n = int(mask[row].sum())
        single = model.generate(input_ids=ids[row : row + 1, -n:], attention_mask=mask[row : row + 1, -n:],
                                max_new_tokens=10, **GEN)
        assert torch.equal(batched[row, -10:], single[0, -10:]), f"row {row}"


def test_h2o_mass_equals_full_attention_reference():
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    ids, mask = left_padded_batch(batch=2, length=20, pads=(0, 5))
    with torch.no_grad():
        attn = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model = kvpress.wrap(tiny_model("llama"))
    cache = kvpress.KVPressCache(model.config, press=H2OPress(compression_ratio=0.5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    for layer, weights in zip(cache.layers, attn):
        weights = weights * mask[:, None, :, None]  # padding queries do not vote
        ref = weights.sum(dim=2).view(2, 2, 2, 20).sum(dim=2)  # (B, Hkv, T): over queries and the GQA group
        torch.testing.assert_close(layer.press_state.mass, ref, atol=1e-5, rtol=1e-4)


def test_h2o_max_tokens_bounds_decode_and_memory_stays_flat():
    model = kvpress.wrap(tiny_model("llama"))
    bound = 24
    cache = kvpress.KVPressCache(model.config, press=H2OPress(max_tokens=bound, recent=4))
    seen = []  # measured after every forward (hook on the last decoder layer)
    hook = model.model.layers[-1].register_forward_hook(
        lambda *a: seen.append((max(cache.stats()["stored_tokens_per_layer"]), cache.stats()["nbytes"])))
    ids, mask = left_padded_batch(batch=1, length=40, pads=(0,))
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=200, **GEN)
    hook.remove()
    assert len(seen) == 200
    assert seen[0][0] == 40  # the prompt is fully observed, then compressed when decoding starts
    assert max(s for s, _ in seen[1:]) <= bound
    assert cache.get_seq_length() == 40 + 199
    decode_bytes = {b for _, b in seen[1:]}
    assert len(decode_bytes) == 1  # flat: no growth once the bound is reached


def test_chunked_prefill_compressing_every_chunk_bounds_storage():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=96, pads=(0,))
    cache = kvpress.KVPressCache(model.config, press=KnormPress(compression_ratio=0.5), compress_every_chunk=True)
    peaks = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda *a: peaks.append(max(cache.stats()["stored_tokens_per_layer"], default=0)))
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                   prefill_chunk_size=16, **GEN)
    hook.remove()
    # before each chunk the cache holds at most half of what it has seen; the full prompt is never stored
    assert max(peaks) <= 48
    assert cache.stats()["stored_tokens_per_layer"][0] == 48 + 1
