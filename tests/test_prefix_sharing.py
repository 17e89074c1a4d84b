"""Prefix sharing across generate calls: identical outputs, prefill skipped, pages shared, clean failures."""
import pytest
import torch

import kvpress
from tiny_models import tiny_model

GEN = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)


def _prompts(seed=3):
    g = torch.Generator().manual_seed(seed)
    doc_a = torch.randint(3, 128, (70,), generator=g).tolist()
    doc_b = torch.randint(3, 128, (40,), generator=g).tolist()
    tail = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    return [doc_a + tail(5), doc_b + tail(12), doc_a + tail(9), doc_a[:50] + tail(20), doc_b + tail(3),
            tail(30), doc_a + tail(1), doc_a + tail(33)]


SPEC = "int8-int4:g8:r8:s2"
COMPRESSION = {  # (wrap's compression, the PrefixCache's `quant`: codes shared in place)
    "fp": ({}, None), "quant-copy": ({"quant": SPEC}, None), "quant-shared-codes": ({"quant": SPEC}, SPEC),
    "snapkv": ({"press": kvpress.SnapKVPress(compression_ratio=0.5, window_size=8)}, SPEC),
    "streaming+quant": ({"press": "streaming:0.5", "quant": SPEC}, None),
    # 2-bit values, both fields stored Hadamard-rotated: the shared codes are read with their rotations
    "rotated-shared-codes": ({"quant": "int4-int2:g8:r8:s2"}, "int4-int2:g8:r8:s2"),
    # same bits, but the pool's codes are unrotated: not the request's codes, so it keeps its own copy
    "rotated-vs-unrotated-pool": ({"quant": "int4-int2:g8:r8:s2"}, "int4-int2:g8:r8:s2:rotnone"),
}


@pytest.mark.parametrize("compression,pool_quant", COMPRESSION.values(), ids=COMPRESSION.keys())
def test_outputs_equal_without_prefix_cache_over_interleaved_calls(compression, pool_quant):
    model = tiny_model("qwen2")
    prompts = _prompts()
    kvpress.wrap(model, **compression)
    # same batches without the prefix cache (a quantized left-padded batch widens its fp sinks by its padding, so
    # batched rows are compared with the same batching)
    reference = {size: kvpress.generate_many(model, prompts, batch_size=size, **GEN) for size in (1, 3)}
    if compression:  # the comparison can tell: compression changes some outputs of this model
        kvpress.wrap(model)
        assert reference[1] != kvpress.generate_many(model, prompts, **GEN)
    cache = kvpress.PrefixCache(max_tokens=2048, quant=pool_quant)
    kvpress.wrap(model, paged=True, prefix_cache=cache, **compression)
    for round_ in range(2):  # second round: everything hits
        for batch_size in (1, 3):
            assert kvpress.generate_many(model, prompts, batch_size=batch_size, **GEN) == reference[batch_size]
        cache.check_invariants()
    stats = cache.stats()
    assert stats["matched_tokens"] > 0.5 * stats["queried_tokens"]
    assert stats["live_matches"] == 0


def test_rows_with_different_match_lengths_and_prefill_skipped():
    model = tiny_model("llama")
    prompts = _prompts()
    cache = kvpress.PrefixCache(max_tokens=2048)
    kvpress.wrap(model, paged=True, prefix_cache=cache)
    kvpress.generate_many(model, [prompts[0], prompts[1]], **GEN)  # warms doc_a and doc_b
    computed = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: computed.append(a[0].numel()))
    out = kvpress.generate_many(model, [prompts[2], prompts[4], prompts[5]], batch_size=3, **GEN)
    hook.remove()
    prefill = sum(computed) - 3 * GEN["max_new_tokens"]  # decode steps feed one token per row
    full = sum(len(p) for p in (prompts[2], prompts[4], prompts[5]))
    assert prefill < full - 64  # doc_a's 64 and doc_b's 32 page-aligned tokens were not recomputed
    kvpress.wrap(model)
    assert out == [kvpress.generate_many(model, [p], **GEN)[0] for p in (prompts[2], prompts[4], prompts[5])]


def test_shared_pages_are_held_once():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(3, 128, (640,), generator=g).tolist()
    prompts = [doc + torch.randint(3, 128, (6,), generator=g).tolist() for _ in range(8)]
    cache = kvpress.PrefixCache(max_tokens=8192)
    kvpress.wrap(model, paged=True, prefix_cache=cache)
    kvpress.generate_many(model, prompts[:1], **GEN)
    kvpress.generate_many(model, prompts, batch_size=8, **GEN)
    per_request = kvpress.last_generate_stats(model)["nbytes"]
    unshared = kvpress.KVPressCache(model.config)
    kvpress.wrap(model)
    ids = torch.tensor(prompts)
    model.generate(input_ids=ids, past_key_values=unshared, **GEN)
    # each request holds its private tokens (6 + 8 per row, plus store growth slack) instead of 646 + 8 per row;
    # the 640 shared tokens are held once, by the PrefixCache's pool
    assert per_request < 0.2 * unshared.stats()["nbytes"]
    assert cache.stats()["tokens_cached"] < 2 * 640 + 8 * 16


def test_full_pool_raises_and_leaves_a_working_cache():
    model = tiny_model("llama")
    cache = kvpress.PrefixCache(max_tokens=32)  # two pages
    kvpress.wrap(model, paged=True, prefix_cache=cache)
    long_prompt = list(range(3, 120))
    with pytest.raises(RuntimeError, match="max_tokens"):
        kvpress.generate_many(model, [long_prompt], **GEN)
    cache.check_invariants()
    assert cache.stats()["live_matches"] == 0
    assert kvpress.generate_many(model, [list(range(3, 20))], **GEN)  # the next call works


def test_prefix_cache_rejects_compression_and_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="paged=True"):
        kvpress.wrap(model, prefix_cache=kvpress.PrefixCache(max_tokens=64))
    with pytest.raises(ValueError, match="H2OPress"):
        kvpress.wrap(model, paged=True, press="h2o:0.5", prefix_cache=kvpress.PrefixCache(max_tokens=64))
    with pytest.raises(ValueError, match="PrefixCache"):
        kvpress.PagedKVCache(model.config, prefix_cache=None)
    with pytest.raises(ValueError, match="not a valid quantization"):
        kvpress.wrap(model, paged=True, prefix_cache=kvpress.PrefixCache(max_tokens=64, quant="int3"))
    with pytest.raises(ValueError, match="PrefixCache"):
        kvpress.wrap(model, paged=True, prefix_cache={"max_tokens": 64})


def test_paged_kv_cache_passed_to_generate_shares_and_reports_pages():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(3, 128, (96,), generator=g).tolist()
    ids = torch.tensor([doc + torch.randint(3, 128, (7,), generator=g).tolist() for _ in range(3)])
    prefix_cache = kvpress.PrefixCache(max_tokens=1024)
    kvpress.wrap(model)
    reference = model.generate(input_ids=ids, quant="int8-int4:g8:r8:s2", **GEN)
    reference_bytes = kvpress.last_generate_stats(model)["nbytes"]
    first = kvpress.PagedKVCache(model.config, prefix_cache, quant="int8-int4:g8:r8:s2")
    assert torch.equal(model.generate(input_ids=ids[:1], past_key_values=first, **GEN), reference[:1])
    assert first.stats()["pages_used"] == 0
    cache = kvpress.PagedKVCache(model.config, prefix_cache, quant="int8-int4:g8:r8:s2")
    assert torch.equal(model.generate(input_ids=ids, past_key_values=cache, **GEN), reference)
    stats = cache.stats()
    assert stats["matched_tokens"] == [96, 96, 96]
    assert stats["pages_used"] == 6 and stats["pages_shared"] == 6  # 96 tokens = 6 pages, read by all 3 rows
    # a compressed request holds its own quantized copy: the same bytes as without the prefix cache
    assert stats["quant"].startswith("int8-int4") and stats["nbytes"] == reference_bytes
    with pytest.raises(ValueError, match="fresh"):
        model.generate(input_ids=ids, past_key_values=cache, **GEN)
    prefix_cache.check_invariants()
    assert prefix_cache.stats()["live_matches"] == 0


def _shared_codes_run(model, spec: str):
    """Three prompts sharing a 96-token doc, generated without and then with a PrefixCache(quant=spec) that holds
    the doc: asserts equal outputs; returns (stats without, stats with, the prefix cache)."""
    g = torch.Generator().manual_seed(6)
    doc = torch.randint(3, 128, (96,), generator=g).tolist()
    ids = torch.tensor([doc + torch.randint(3, 128, (7,), generator=g).tolist() for _ in range(3)])
    kvpress.wrap(model, quant=spec)
    reference = model.generate(input_ids=ids, **GEN)
    unshared = kvpress.last_generate_stats(model)
    prefix_cache = kvpress.PrefixCache(max_tokens=1024, quant=spec)
    kvpress.wrap(model, paged=True, prefix_cache=prefix_cache, quant=spec)
    model.generate(input_ids=ids[:1], **GEN)  # stores doc (full precision + codes)
    assert torch.equal(model.generate(input_ids=ids, **GEN), reference)
    return unshared, kvpress.last_generate_stats(model), prefix_cache


def test_quantized_requests_read_the_shared_codes_in_place():
    unshared, stats, prefix_cache = _shared_codes_run(tiny_model("llama"), SPEC)
    # 96 matched tokens per row; slots [2 sinks, 103 - 8 window) = 93 quantized tokens per row are read in place
    assert stats["stored_tokens"] == unshared["stored_tokens"] - 93
    assert stats["nbytes"] < 0.5 * unshared["nbytes"]
    assert stats["pages_used"] == 6 and stats["pages_shared"] == 6
    prefix_cache.check_invariants()


def test_prefix_cache_codes_adapt_to_head_dim_96_like_wraps_quant():
    """PrefixCache(quant="int8-int4") on a head_dim-96 model (Phi-3): its default value group adapts (32 -> 16) as
    wrap's does, so the pool's codes are the request's and are read in place; an explicit group that cannot fit is
    refused at wrap."""
    from tiny_models import head_dim_model

    model = head_dim_model(96, "phi3")
    unshared, stats, prefix_cache = _shared_codes_run(model, "int8-int4:r8:s2")  # default g32 does not divide 48
    assert stats["stored_tokens"] == unshared["stored_tokens"] - 93  # the shared codes were read in place
    assert prefix_cache.pool.layers[0]["v_scale"].shape[-1] == 96 // 16
    prefix_cache.check_invariants()
    with pytest.raises(ValueError, match=r"PrefixCache\(quant='int8-int4:g32'\).*head_dim=96.*nearest valid spec"):
        kvpress.wrap(model, paged=True, prefix_cache=kvpress.PrefixCache(max_tokens=64, quant="int8-int4:g32"))


@pytest.mark.parametrize("compression,pool_quant", [COMPRESSION["quant-shared-codes"], COMPRESSION["snapkv"]],
                         ids=["quant-shared-codes", "snapkv"])
def test_short_and_fully_cached_prompts_with_compression(compression, pool_quant):
    model = tiny_model("llama")
    doc = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [[5], doc[:2], doc[:17], doc, doc + [7], doc + [9, 11]]  # 1-token prompt, empty rows, full hits
    kvpress.wrap(model, **compression)
    reference = {size: kvpress.generate_many(model, prompts, batch_size=size, **GEN) for size in (1, 6, 3)}
    cache = kvpress.PrefixCache(max_tokens=1024, quant=pool_quant)
    kvpress.wrap(model, paged=True, prefix_cache=cache, **compression)
    for batch_size in (1, 6, 3):
        assert kvpress.generate_many(model, prompts, batch_size=batch_size, **GEN) == reference[batch_size]
    cache.check_invariants()


@pytest.mark.parametrize("compression,pool_quant", [COMPRESSION["fp"], COMPRESSION["quant-shared-codes"]],
                         ids=["fp", "quant-shared-codes"])
def test_beam_search_and_several_samples_per_prompt(compression, pool_quant):
    model = tiny_model("llama")
    doc = torch.randint(3, 128, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    first, second = torch.tensor([doc + [7, 8, 9]]), torch.tensor([doc + [17, 18, 19, 20], doc[:30] + [5] * 34])
    beams = dict(max_new_tokens=6, do_sample=False, num_beams=2, num_return_sequences=2, eos_token_id=None,
                 pad_token_id=0)
    kvpress.wrap(model, **compression)
    reference = model.generate(input_ids=second, **beams)
    prefix_cache = kvpress.PrefixCache(max_tokens=1024, quant=pool_quant)
    kvpress.wrap(model, paged=True, prefix_cache=prefix_cache, **compression)
    model.generate(input_ids=first, **beams)
    assert torch.equal(model.generate(input_ids=second, **beams), reference)
    assert kvpress.last_generate_stats(model)["matched_tokens"] == [48, 16]
    torch.manual_seed(0)
    sampled = model.generate(input_ids=second, do_sample=True, num_return_sequences=3, max_new_tokens=4,
                             eos_token_id=None, pad_token_id=0)
    assert sampled.shape == (6, second.shape[1] + 4)
    prefix_cache.check_invariants()
    assert prefix_cache.stats()["live_matches"] == 0


@pytest.mark.parametrize("prefix", [False, True], ids=["plain", "prefix-cache"])
def test_generate_many_returns_every_returned_sequence_of_each_prompt_in_order(prefix):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    doc = torch.randint(3, 128, (40,), generator=g).tolist()
    prompts = [doc + [90, 91], [120] + doc[:20], doc + [4, 5, 6, 7, 8]]  # sorted order differs from this one
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2, eos_token_id=None,
                 pad_token_id=0)
    reference = [model.generate(input_ids=torch.tensor([p]), **beams)[:, len(p):].tolist() for p in prompts]
    assert reference[0] != reference[2]
    if prefix:
        kvpress.wrap(model, paged=True, prefix_cache=kvpress.PrefixCache(max_tokens=1024))
        kvpress.generate_many(model, prompts[:1], **GEN)  # warm: later rows hit
    out = kvpress.generate_many(model, prompts, batch_size=3, **beams)
    assert out == reference  # per prompt, in the caller's order: its 2 sequences, as generate orders them


def test_models_of_one_architecture_with_other_weights_never_share_prefixes():
    """Same name, architecture, dtype and layer count, other weights (two fine-tunes of one base): no shared KV.
    The namespace hashes sampled weights (or takes an explicit key), so equal weights still share."""
    first, other, same = tiny_model("llama", seed=0), tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    ids = torch.tensor([torch.randint(3, 128, (53,), generator=torch.Generator().manual_seed(2)).tolist()])
    plain = {name: m.generate(input_ids=ids, **GEN) for name, m in (("first", first), ("other", other))}
    assert not torch.equal(plain["first"], plain["other"])
    prefix_cache = kvpress.PrefixCache(max_tokens=1024)
    for m in (first, other, same):
        kvpress.wrap(m, paged=True, prefix_cache=prefix_cache)
    matched = lambda m: kvpress.last_generate_stats(m)["matched_tokens"]  # noqa: E731
    assert torch.equal(first.generate(input_ids=ids, **GEN), plain["first"]) and matched(first) == [0]
    assert torch.equal(other.generate(input_ids=ids, **GEN), plain["other"]) and matched(other) == [0]
    assert torch.equal(same.generate(input_ids=ids, **GEN), plain["first"]) and matched(same) == [48]
    assert torch.equal(other.generate(input_ids=ids, **GEN), plain["other"]) and matched(other) == [48]
    kvpress.wrap(same, paged=True, prefix_cache=prefix_cache, prefix_namespace="revision-2")  # an explicit key
    assert torch.equal(same.generate(input_ids=ids, **GEN), plain["first"]) and matched(same) == [0]
    prefix_cache.check_invariants()
