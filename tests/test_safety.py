"""Exception safety: a press or a kernel that raises in generate/compress leaves no locked or leaked pages and no
half-updated layer, and the next call on the same model (and cache) works."""
from dataclasses import dataclass

import pytest
import torch

import kvpress
import kvpress.attention
from kvpress.presses.knorm import KnormPress
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_model

GEN = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)


class Boom(RuntimeError):
    """The failure injected by these tests."""


@dataclass
class FlakyKnorm(KnormPress):
    """Knorm whose score() raises its first `failures` calls."""

    failures: int = 1

    def score(self, inputs):
        if self.failures > 0:
            self.failures -= 1
            raise Boom("score failed")
        return super().score(inputs)


def _doc_prompts(n_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(3, 128, (48,), generator=g).tolist()
    return torch.tensor([doc + torch.randint(3, 128, (5,), generator=g).tolist() for _ in range(n_rows)])


def _assert_no_pages_held_by_calls(prefix_cache):
    """Invariants hold, no live match, every used page is held by the tree alone; evicting all frees the pool."""
    prefix_cache.check_invariants()
    assert prefix_cache.stats()["live_matches"] == 0
    pool, tree = prefix_cache.pool, prefix_cache.tree
    assert all(pool.refcount(p) == (p in tree.held_pages()) for p in range(pool.num_pages))
    tree.evict(pool.num_pages)
    assert pool.pages_free == pool.num_pages
    prefix_cache.check_invariants()


def test_press_raising_in_wrapped_generate_leaves_the_model_working():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=3, length=24)
    kvpress.wrap(model, press="knorm:0.5")
    reference = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    kvpress.wrap(model, press=FlakyKnorm(compression_ratio=0.5, failures=10**6))
    with pytest.raises(Boom):
        model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, press="knorm:0.5", **GEN), reference)
    kvpress.wrap(model, press="knorm:0.5")
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GEN), reference)


def test_compress_that_raised_is_retried_not_dropped():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=3, length=24)
    expected = kvpress.KVPressCache(model.config, press=KnormPress(compression_ratio=0.5))
    flaky = kvpress.KVPressCache(model.config, press=FlakyKnorm(compression_ratio=0.5, failures=1))
    with torch.no_grad():
        for cache in (expected, flaky):
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    expected.compress()
    with pytest.raises(Boom):
        flaky.compress()
    assert flaky.layers[0].needs_compression and flaky.layers[0].stored_length == 24  # untouched, still pending
    flaky.compress()  # the retry compresses exactly as a first success would have
    assert flaky.stats()["stored_tokens_per_layer"] == expected.stats()["stored_tokens_per_layer"]
    for a, b in zip(flaky.layers, expected.layers):
        assert torch.equal(a.keys, b.keys) and not a.needs_compression


def test_compression_failing_at_the_first_decode_step_raises_every_time_then_reset_works():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=3, length=24)
    reference = model.generate(input_ids=ids, attention_mask=mask, press="knorm:0.5", **GEN)
    cache = kvpress.KVPressCache(model.config, press=FlakyKnorm(compression_ratio=0.5, failures=2))
    for _ in range(2):  # never a silent "generated without compressing"
        with pytest.raises(Boom):
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
        cache.reset()
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN), reference)
    assert cache.stats()["stored_tokens"] < 24


def _raise_on_call(monkeypatch, name, n):
    """Make kvpress.attention.<name> (a kernel entry point) raise on its n-th call."""
    real, calls = getattr(kvpress.attention, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Boom(f"{name} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(kvpress.attention, name, failing)
    return calls


def test_kernel_raising_mid_decode_with_a_prefix_cache_releases_every_page(monkeypatch):
    model = tiny_model("llama")
    ids = _doc_prompts()
    kvpress.wrap(model)
    reference = model.generate(input_ids=ids, **GEN)
    prefix_cache = kvpress.PrefixCache(max_tokens=1024)
    kvpress.wrap(model, paged=True, prefix_cache=prefix_cache)
    model.generate(input_ids=ids[:1], **GEN)  # stores the shared document
    calls = _raise_on_call(monkeypatch, "decode_attention_multi", 5)  # layer 1 of the 3rd decode step
    with pytest.raises(Boom):
        model.generate(input_ids=ids, **GEN)
    assert len(calls) == 5
    prefix_cache.check_invariants()
    assert prefix_cache.stats()["live_matches"] == 0
    monkeypatch.undo()
    assert torch.equal(model.generate(input_ids=ids, **GEN), reference)  # the next call works (and still hits)
    assert kvpress.last_generate_stats(model)["matched_tokens"] == [48, 48, 48]
    _assert_no_pages_held_by_calls(prefix_cache)


def test_failing_match_releases_the_hits_taken_before_it(monkeypatch):
    model = tiny_model("llama")
    ids = _doc_prompts()
    prefix_cache = kvpress.PrefixCache(max_tokens=1024)
    kvpress.wrap(model, paged=True, prefix_cache=prefix_cache)
    model.generate(input_ids=ids[:1], **GEN)
    real, calls = prefix_cache.match, []

    def match(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("match failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix_cache, "match", match)
    with pytest.raises(Boom):
        model.generate(input_ids=ids, **GEN)
    assert len(calls) == 3
    _assert_no_pages_held_by_calls(prefix_cache)


def test_cache_left_mid_forward_refuses_reuse_until_reset(monkeypatch):
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=3, length=24)
    spec = "int8-int4:g8:r4:s2"
    reference = model.generate(input_ids=ids, attention_mask=mask, quant=spec, **GEN)
    cache = kvpress.KVPressCache(model.config, quant=spec)
    layer, real, calls = cache.layers[1], cache.layers[1].append, []

    def append(*args, **kwargs):  # layer 1 fails to store the first decoded token; layer 0 stored it
        calls.append(1)
        if len(calls) == 2:
            raise Boom("store failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "append", append)
    with pytest.raises(Boom):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="reset"):  # never attends a torn cache
        model(input_ids=ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
    cache.reset()
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN), reference)
