"""TOVAPress: scores by hand, the tokens it keeps inside the cache, generate with and without quantization, chunked
compression, batch rows equal batch-1 runs, prefix sharing, and the registry string."""
import math

import pytest
import torch

import kvpress
from kvpress.presses import ScoringInputs, TOVAPress, parse_press
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def test_scores_equal_a_hand_computation() -> None:
    # 1 kv head, 2 query heads (one group), D = 1: logits are q * k * scale over the row's real keys
    keys = torch.tensor([1.0, 2.0, 0.0, -1.0]).reshape(1, 1, 4, 1)
    queries = torch.tensor([[9.0, 1.0], [9.0, -1.0]]).reshape(1, 2, 2, 1)  # heads x (earlier query, last query)
    valid = torch.tensor([[False, True, True, True]])  # token 0 is left padding
    scores = TOVAPress().score(ScoringInputs(keys, keys, valid, 0.5, queries=queries))
    # only the last query counts: head 0 (q = 1) has logits 0.5 * k = [1, 0, -0.5] over the real keys [2, 0, -1],
    # head 1 (q = -1) has [-1, 0, 0.5]
    head0 = torch.softmax(torch.tensor([1.0, 0.0, -0.5]), dim=0)
    head1 = torch.softmax(torch.tensor([-1.0, 0.0, 0.5]), dim=0)
    expected = torch.cat([torch.zeros(1), (head0 + head1) / 2])
    assert scores.shape == (1, 1, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0, 0], expected)


def test_gqa_groups_and_rows_are_scored_apart() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 6, 4, generator=generator, dtype=torch.float64)
    queries = torch.randn(2, 4, 3, 4, generator=generator, dtype=torch.float64)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    scores = TOVAPress().score(ScoringInputs(keys, keys, valid, 0.25, queries=queries))
    for b in range(2):
        for kv_head in range(2):
            probs = []
            for head in (2 * kv_head, 2 * kv_head + 1):  # query head h reads kv head h // 2
                logits = [float(queries[b, head, -1] @ keys[b, kv_head, t]) * 0.25 for t in range(6)]
                real = [t for t in range(6) if valid[b, t]]
                norm = sum(math.exp(logits[t]) for t in real)
                probs.append([math.exp(logits[t]) / norm if valid[b, t] else 0.0 for t in range(6)])
            expected = torch.tensor([(p + q) / 2 for p, q in zip(*probs)], dtype=torch.float32)
            torch.testing.assert_close(scores[b, kv_head], expected)


def test_keeps_the_most_attended_tokens_and_sinks_and_recent() -> None:
    keys = torch.tensor([0.0, 3.0, -1.0, 2.5, 0.0, 1.0, 0.0, 0.0]).reshape(1, 1, 8, 1)
    queries = torch.tensor([2.0]).reshape(1, 1, 1, 1)
    valid = torch.ones(1, 8, dtype=torch.bool)
    press = TOVAPress(compression_ratio=0.5, n_sink=1, recent=1)
    idx = press.keep_indices(ScoringInputs(keys, keys, valid, 1.0, queries=queries))
    assert idx.tolist() == [[[0, 1, 3, 7]]]  # sink 0, the two largest keys, the last token
    with pytest.raises(ValueError, match="queries"):
        press.score(ScoringInputs(keys, keys, valid, 1.0))


def test_cache_keeps_the_tokens_the_last_prompt_query_attends_to() -> None:
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=24, pads=(0,))
    cache = kvpress.KVPressCache(model.config, press=TOVAPress(compression_ratio=0.5, n_sink=2, recent=2))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    expected = []
    for layer in cache.layers:
        state = layer.press_state
        assert state.queries.shape[2] == 1  # only the last prompt query is kept
        valid = torch.ones(1, 24, dtype=torch.bool)
        scores = layer.press.score(ScoringInputs(layer.keys, layer.values, valid, 16 ** -0.5, queries=state.queries))
        idx = layer.press.select(scores, 12, valid)
        expected.append(torch.gather(layer.keys, 2, idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])))
    cache.compress()
    for layer, keys in zip(cache.layers, expected):
        assert layer.press_state.queries is None  # used by this compression, then forgotten
        torch.testing.assert_close(layer.keys, keys)


@pytest.mark.parametrize("quant", [None, "int8-int4:g8:r4:s2"])
def test_generate_with_and_without_quant(quant) -> None:
    model = kvpress.wrap(tiny_model("llama"), press="tova:0.5", quant=quant)
    ids, mask = left_padded_batch(batch=1, length=40, pads=(0,))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **GEN)
    assert out.shape == (1, 46)
    stats = kvpress.last_generate_stats(model)
    assert stats["stored_tokens"] == 20 + 5 and stats["logical_tokens"] == 45
    assert stats["press"].startswith("TOVAPress")


def test_compress_every_chunk_bounds_storage() -> None:
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=1, length=96, pads=(0,))
    cache = kvpress.KVPressCache(model.config, press=TOVAPress(compression_ratio=0.5), quant="int8-int4:g8:r4:s2",
                                 compress_every_chunk=True)
    peaks = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda *a: peaks.append(max(cache.stats()["stored_tokens_per_layer"], default=0)))
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                   prefill_chunk_size=16, **GEN)
    hook.remove()
    assert max(peaks) <= 48
    assert cache.stats()["stored_tokens_per_layer"][0] == 48 + 1


def test_batched_left_padded_rows_equal_batch_one_runs() -> None:
    model = kvpress.wrap(tiny_model("qwen2"), press=TOVAPress(compression_ratio=0.5, n_sink=2, recent=4))
    ids, mask = left_padded_batch(batch=3, length=36, pads=(0, 9, 4))
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN)
    for row in range(3):
        n = int(mask[row].sum())
        single = model.generate(input_ids=ids[row : row + 1, -n:], attention_mask=mask[row : row + 1, -n:],
                                max_new_tokens=10, **GEN)
        assert torch.equal(batched[row, -10:], single[0, -10:]), f"row {row}"


def test_prefix_sharing_gives_the_same_outputs() -> None:
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(3, 128, (70,), generator=g).tolist()
    prompts = [doc + torch.randint(3, 128, (n,), generator=g).tolist() for n in (4, 9, 1)]
    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    kvpress.wrap(model, press="tova:0.5")
    reference = kvpress.generate_many(model, prompts, batch_size=3, **gen)
    kvpress.wrap(model, press="tova:0.5", paged=True, prefix_cache=kvpress.PrefixCache(max_tokens=1024))
    for _ in range(2):  # the second round matches the whole document
        assert kvpress.generate_many(model, prompts, batch_size=3, **gen) == reference


def test_registry_string_parses() -> None:
    press = parse_press("tova:0.25:n_sink=4,recent=8")
    assert isinstance(press, TOVAPress) and kvpress.TOVAPress is TOVAPress
    assert (press.compression_ratio, press.n_sink, press.recent, press.query_window) == (0.25, 4, 8, 1)
