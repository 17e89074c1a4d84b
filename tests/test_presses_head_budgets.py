"""Per-head budgets (`budget=adaptive` / `budget=global`): selection, ragged storage that really frees memory, and
attention over heads of different lengths (one row per (row, kv head) through the unchanged kernels and twins)."""
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvpress
from kvpress.hf_compat import cache_kwargs
from kvpress.kernels.head_rows import as_head_rows, merge_heads, split_heads
from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.store import KVStore, chunk_store
from kvpress.paged.ragged import PAGE_TOKENS, RaggedStore
from kvpress.presses import KnormPress, SnapKVPress
from kvpress.presses.head_budgets import HEAD_FLOOR, head_floor, keep_by_score, keep_per_head
from kvpress.presses.registry import parse_press
from tiny_models import left_padded_batch, tiny_configs, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


# --- selection ---------------------------------------------------------------------------------------------------
def test_keep_by_score_shares_the_total_by_score_above_a_floor_per_head():
    g = torch.Generator().manual_seed(0)
    ranked = torch.rand(4, 50, generator=g)
    ranked[0] += 10  # head 0 holds the best scores: it takes most of the total
    ranked[:, :2] = float("inf")  # forced tokens (sinks)
    ranked[:, 45:] = float("-inf")  # padding
    keep = keep_by_score(ranked, per_head=20)
    counts = keep.sum(dim=1)
    assert int(counts.sum()) == 4 * 20
    assert bool(keep[:, :2].all()) and not bool(keep[:, 45:].any())
    floor = head_floor(20)
    assert floor == math.ceil(HEAD_FLOOR * 20) and bool((counts >= floor).all())
    assert counts[0] == 45  # every real token of head 0 (its scores beat all others), the rest over heads 1..3
    rest = ranked[1:].masked_fill(ranked[1:].isinf(), 0).flatten()
    threshold = torch.sort(rest, descending=True).values[35 - 3 * 2 - 1]  # 35 kept there, 6 of them forced
    assert bool((ranked[1:][keep[1:] & ranked[1:].isfinite()] >= threshold).all())


def test_keep_per_head_over_several_layers_is_one_selection():
    g = torch.Generator().manual_seed(1)
    layers = [torch.rand(2, 3, 30, generator=g) for _ in range(3)]
    layers[2] = layers[2] * 0.01  # the last layer scores low everywhere: it keeps about its floor
    masks = keep_per_head(layers, [10, 6])
    for b, per_head in enumerate([10, 6]):
        total = sum(int(m[b].sum()) for m in masks)
        assert total == per_head * 3 * 3
        assert all(int(m[b, h].sum()) >= head_floor(per_head) for m in masks for h in range(3))
    assert int(masks[2][0].sum()) == 3 * head_floor(10)


# --- ragged storage ----------------------------------------------------------------------------------------------
def test_ragged_store_packs_each_head_at_its_own_length():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 40, 8, generator=g)
    keep = torch.rand(2, 3, 40, generator=g) < torch.tensor([0.1, 0.5, 0.9])[None, :, None]
    store = RaggedStore.build({"k": k}, keep)
    lengths = keep.sum(dim=2).flatten()
    assert store.lengths.tolist() == lengths.tolist() and store.total_tokens == int(lengths.sum())
    pages = store.fields["k"]
    assert pages.shape[0] == int(((lengths + PAGE_TOKENS - 1) // PAGE_TOKENS).sum())  # no page beyond need
    for row in range(6):
        b, h = divmod(row, 3)
        slots = [int(store.block_table[row, i // PAGE_TOKENS]) * PAGE_TOKENS + i % PAGE_TOKENS
                 for i in range(int(lengths[row]))]
        assert torch.equal(pages.reshape(-1, 8)[slots], k[b, h][keep[b, h]])
    repeated = store.index_batch(torch.tensor([1, 1, 0]))
    assert repeated.fields["k"] is pages and repeated.lengths.tolist() == lengths[[3, 4, 5, 3, 4, 5, 0, 1, 2]].tolist()


def _dense_attention(q, keys, values, visible, scale):
    """float64 attention of q (B, Hq, Q, D) over keys/values (B, H, T, D) where visible (B, H, Q, T)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible.repeat_interleave(group, 1), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def _ragged_case(seed=3, batch=2, heads=2, group=2, n_tokens=45, head_dim=32):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n_tokens, head_dim, generator=g)
    values = torch.randn(batch, heads, n_tokens, head_dim, generator=g)
    keep = torch.rand(batch, heads, n_tokens, generator=g) < 0.5
    keep[:, :, 0] = True
    window_k = torch.randn(batch, heads, 5, head_dim, generator=g)
    window_v = torch.randn(batch, heads, 5, head_dim, generator=g)
    return keys, values, keep, window_k, window_v, g


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_over_heads_of_different_lengths_equals_masked_attention(backend):
    keys, values, keep, wk, wv, g = _ragged_case()
    batch, heads, _, head_dim = keys.shape
    ragged = RaggedStore.build({"k": keys, "v": values}, keep)
    window = KVStore(k=wk, v=wv, block_table=torch.arange(batch, dtype=torch.int32)[:, None], kv_end=5)
    stores = (KVStore(k=ragged.fields["k"], v=ragged.fields["v"], block_table=ragged.block_table,
                      kv_end=ragged.lengths), as_head_rows(window))
    q = torch.randn(batch, heads * 2, head_dim, generator=g)
    attend = decode_attention_multi_triton if backend == "triton" else decode_attention_multi_reference
    out, _ = attend(split_heads(q, heads), stores, 0.3)
    visible = torch.cat([keep, torch.ones(batch, heads, 5, dtype=torch.bool)], dim=2)[:, :, None]
    expected = _dense_attention(q[:, :, None], torch.cat([keys, wk], 2), torch.cat([values, wv], 2), visible, 0.3)
    torch.testing.assert_close(merge_heads(out, batch).double(), expected[:, :, 0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_extend_over_heads_of_different_lengths_with_a_causal_chunk(backend):
    keys, values, keep, ck, cv, g = _ragged_case(seed=4)
    batch, heads, n_tokens, head_dim = keys.shape
    ragged = RaggedStore.build({"k": keys, "v": values}, keep)
    stores = (KVStore(k=ragged.fields["k"], v=ragged.fields["v"], block_table=ragged.block_table,
                      kv_end=ragged.lengths), as_head_rows(chunk_store(ck, cv, None)))
    q = torch.randn(batch, heads * 2, 5, head_dim, generator=g)
    attend = extend_attention_multi_triton if backend == "triton" else extend_attention_multi_reference
    out, _ = attend(split_heads(q, heads), stores, 0.3)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    visible = torch.cat([keep[:, :, None].expand(-1, -1, 5, -1), causal.expand(batch, heads, 5, 5)], dim=3)
    expected = _dense_attention(q, torch.cat([keys, ck], 2), torch.cat([values, cv], 2), visible, 0.3)
    torch.testing.assert_close(merge_heads(out, batch).double(), expected, atol=2e-5, rtol=2e-5)


# --- through the cache and generate ------------------------------------------------------------------------------
@dataclass
class UniformThroughHeads(SnapKVPress):
    """SnapKV's per-head selection (the same count in every head) stored through the per-head path."""

    def keep_masks(self, ranked, budgets):
        masks = []
        for r in ranked:
            mask = torch.zeros_like(r, dtype=torch.bool)
            for b, n in enumerate(budgets):
                mask[b].scatter_(1, torch.topk(r[b], n, dim=1).indices, True)
            masks.append(mask)
        return masks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_per_head_storage_attends_exactly_like_rectangular_storage(arch):
    """The same selection stored per head (ragged pages, one row per head) or rectangular gives the same tokens."""
    ids, mask = left_padded_batch(batch=3, length=50, pads=(0, 7, 3))
    outs = []
    for press in (SnapKVPress(compression_ratio=0.6, window_size=4),
                  UniformThroughHeads(compression_ratio=0.6, window_size=4, budget="adaptive")):
        model = kvpress.wrap(tiny_model(arch))
        cache = kvpress.KVPressCache(model.config, press=press)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10,
                                   output_scores=True, return_dict_in_generate=True, **GEN))
        if press.per_head_budgets:
            assert all(layer.kv.pressed is not None for layer in cache.layers)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[0].scores), torch.stack(outs[1].scores), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", ["adaptive", "global"])
@pytest.mark.parametrize("quant", [None, "int8-int4:r8:s2"])
def test_batched_rows_equal_their_batch_1_runs(budget, quant):
    ids, mask = left_padded_batch(batch=3, length=48, pads=(0, 6, 2))
    press = f"snapkv:0.5:window_size=4,budget={budget}"
    model = kvpress.wrap(tiny_model("llama"))
    batched = model.generate(input_ids=ids, attention_mask=mask, press=press, quant=quant, max_new_tokens=8, **GEN)
    for b, pad in enumerate((0, 6, 2)):
        alone = model.generate(input_ids=ids[b : b + 1, pad:], attention_mask=mask[b : b + 1, pad:], press=press,
                               quant=quant, max_new_tokens=8, **GEN)
        assert torch.equal(alone[0, -8:], batched[b, -8:])


@pytest.mark.parametrize("budget", ["adaptive", "global"])
def test_heads_keep_different_lengths_and_the_bytes_shrink_by_the_ratio(budget):
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=400, pads=(0,))
    caches = {}
    for name, press in (("full", None), ("uniform", "snapkv:0.5:window_size=4"),
                        ("per_head", f"snapkv:0.5:window_size=4,budget={budget}")):
        caches[name] = kvpress.KVPressCache(model.config, press=press)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, caches[name]))
        caches[name].compress()
    pressed = [layer.kv.pressed for layer in caches["per_head"].layers]
    lengths = torch.stack([p.fp.lengths for p in pressed])
    assert lengths.sum() == 200 * lengths.numel()  # the total of the uniform budget, shared out differently
    assert len(set(lengths.flatten().tolist())) > 1
    if budget == "adaptive":
        assert all(int(p.fp.lengths.sum()) == 200 * p.fp.lengths.numel() for p in pressed)
    full, uniform, per_head = (caches[n].stats()["nbytes"] for n in ("full", "uniform", "per_head"))
    # ragged pages: under one page of 16 tokens per (row, head) over the tokens kept
    page_slack = lengths.numel() * PAGE_TOKENS * 2 * 16 * 4
    assert uniform <= per_head <= uniform + page_slack and per_head < 0.55 * full


def test_beam_search_and_several_sequences_per_prompt():
    ids, mask = left_padded_batch(batch=2, length=40, pads=(0, 4))
    model = kvpress.wrap(tiny_model("llama"))
    out = model.generate(input_ids=ids, attention_mask=mask, press="knorm:0.5:budget=adaptive", num_beams=3,
                         num_return_sequences=2, max_new_tokens=6, **GEN)
    assert out.shape == (4, 46)
    for b, pad in enumerate((0, 4)):
        alone = model.generate(input_ids=ids[b : b + 1, pad:], attention_mask=mask[b : b + 1, pad:],
                               press="knorm:0.5:budget=adaptive", num_beams=3, num_return_sequences=2,
                               max_new_tokens=6, **GEN)
        assert torch.equal(alone[:, -6:], out[2 * b : 2 * b + 2, -6:])


def test_a_question_after_a_compressed_context_extends_like_decoding_it():
    """The kv-press pipeline's path: compress a context once, then prefill a question chunk over the per-head
    store (extend): the same logits as feeding the question token by token (decode)."""
    model = kvpress.wrap(tiny_model("llama"))
    ids, _ = left_padded_batch(batch=1, length=60, pads=(0,))
    question = ids[:, :6] % 100 + 3
    logits = []
    for chunked in (True, False):
        cache = kvpress.KVPressCache(model.config, press="snapkv:0.5:window_size=4,budget=adaptive",
                                     quant="int8-int4:r8:s2")
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache))
            cache.compress(model=model)
            before = cache.stats()["nbytes"]
            if chunked:
                logits.append(model(input_ids=question, **cache_kwargs(model, cache)).logits[0])
            else:
                logits.append(torch.cat([model(input_ids=question[:, i : i + 1], **cache_kwargs(model, cache)).logits[0]
                                         for i in range(6)]))
        layer = cache.layers[0]
        assert layer.kv.pressed is not None and layer.kv.length == 6  # the question is stored as it came
        assert cache.stats()["nbytes"] > before
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_kvzip_with_a_global_budget_runs_through_wrap():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=2, length=40, pads=(0, 5))
    cache = kvpress.KVPressCache(model.config, press="kvzip:0.5:budget=global,chunk_size=16")
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, **GEN)
    assert out.shape == (2, 44)
    lengths = torch.stack([layer.kv.pressed.fp.lengths for layer in cache.layers])
    assert int(lengths[:, :2].sum()) == 20 * 2 * 2 and int(lengths[:, 2:].sum()) == 18 * 2 * 2  # rows 40 / 35 tokens


def test_per_head_budgets_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="budget must be one of"):
        parse_press("snapkv:0.5:budget=perhead")
    with pytest.raises(ValueError, match="compresses the prompt once"):
        parse_press("snapkv:0.5:max_tokens=256,every=8,budget=adaptive")
    with pytest.raises(ValueError, match="decode-time eviction"):
        parse_press("h2o:0.5:max_tokens=256,budget=adaptive")
    with pytest.raises(ValueError, match="split it twice"):
        parse_press("snapkv:0.5:layers=pyramid,budget=global")
    with pytest.raises(ValueError, match="prefix_cache cannot be combined with budget=adaptive"):
        KnormPress(compression_ratio=0.5, budget="adaptive").check_prefix_sharing()
    config = tiny_configs()["llama"]
    with pytest.raises(ValueError, match="compress_every_chunk"):
        kvpress.KVPressCache(config, press="knorm:0.5:budget=adaptive", compress_every_chunk=True)
    with pytest.raises(ValueError, match="budget=adaptive"):
        kvpress.wrap(tiny_model("llama"), press="knorm:0.5:budget=adaptive", paged=True,
                     prefix_cache=kvpress.PrefixCache(max_tokens=256))
