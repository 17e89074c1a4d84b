"""Tests of the chunked attention-mass helpers against full attention weights, and of decode-time victim choice."""
import pytest
import torch

from kvpress.presses import accumulate_attention_mass, decode_victims, window_attention_mass


def reference_mass(
    queries: torch.Tensor, keys: torch.Tensor, sm_scale: float, valid: torch.Tensor, causal_offset: int
) -> torch.Tensor:
    """Full (unchunked) attention weights, causal and padding-masked, summed over queries and each group's heads."""
    batch, q_heads, n_queries, _ = queries.shape
    kv_heads, n_tokens = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    expanded = keys.double().repeat_interleave(group, dim=1)  # query head h uses kv head h // group
    logits = queries.double() @ expanded.transpose(-1, -2) * sm_scale
    query_pos = causal_offset + torch.arange(n_queries)
    allowed = (torch.arange(n_tokens)[None, :] <= query_pos[:, None])[None, None] & valid[:, None, None, :]
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    weights = weights * valid[:, query_pos][:, None, :, None]
    return weights.sum(dim=2).reshape(batch, kv_heads, group, n_tokens).sum(dim=2).float()


def make_inputs(seed: int, batch: int = 2, kv_heads: int = 2, group: int = 3, n_tokens: int = 11, head_dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, n_tokens, head_dim, generator=generator)
    queries = torch.randn(batch, kv_heads * group, n_tokens, head_dim, generator=generator)
    valid = torch.ones(batch, n_tokens, dtype=torch.bool)
    valid[1, :4] = False  # left padding in the second row
    return queries, keys, valid


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_accumulated_mass_matches_full_attention(chunk: int) -> None:
    queries, keys, valid = make_inputs(0)
    got = accumulate_attention_mass(queries, keys, 0.35, valid, causal_offset=0, chunk=chunk)
    torch.testing.assert_close(got, reference_mass(queries, keys, 0.35, valid, 0), rtol=1e-5, atol=1e-5)
    assert got[1, :, :4].abs().max() == 0  # padding keys receive nothing
    assert got.shape == (2, 2, 11)


def test_accumulated_mass_for_a_later_prefill_chunk() -> None:
    queries, keys, valid = make_inputs(1)
    later = queries[:, :, 6:9]  # queries at stored positions 6, 7, 8; keys 9 and 10 are not visible yet
    got = accumulate_attention_mass(later, keys, 0.5, valid, causal_offset=6, chunk=2)
    torch.testing.assert_close(got, reference_mass(later, keys, 0.5, valid, 6), rtol=1e-5, atol=1e-5)
    assert got[:, :, 9:].abs().max() == 0
    # each real query spreads exactly one unit of mass per query head
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.full((2,), 3.0 * 6), rtol=1e-5, atol=1e-5)


def test_accumulated_mass_rejects_bad_arguments() -> None:
    queries, keys, valid = make_inputs(2)
    with pytest.raises(ValueError, match="causal_offset"):
        accumulate_attention_mass(queries[:, :, :5], keys, 0.5, valid, causal_offset=7)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        accumulate_attention_mass(queries[:, :5], keys, 0.5, valid, causal_offset=0)
    with pytest.raises(ValueError, match="chunk"):
        accumulate_attention_mass(queries, keys, 0.5, valid, causal_offset=0, chunk=0)
    with pytest.raises(ValueError, match="sm_scale"):
        accumulate_attention_mass(queries, keys, 0.0, valid, causal_offset=0)


@pytest.mark.parametrize("key_chunk", [1, 4, 1024])
@pytest.mark.parametrize("window", [1, 5, 11])
def test_window_mass_matches_full_attention(window: int, key_chunk: int) -> None:
    queries, keys, valid = make_inputs(3)
    last = queries[:, :, -window:]
    got = window_attention_mass(last, keys, 0.4, valid, key_chunk=key_chunk)
    expected = reference_mass(last, keys, 0.4, valid, keys.shape[2] - window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_window_longer_than_prompt_raises() -> None:
    queries, keys, valid = make_inputs(4, n_tokens=5)
    with pytest.raises(ValueError, match="window"):
        window_attention_mass(torch.cat([queries, queries], dim=2), keys, 0.5, valid)


def test_decode_victims_lowest_mass_outside_sinks_and_recent() -> None:
    mass = torch.tensor([[[0.0, 5.0, 0.1, 3.0, 0.2, 4.0, 0.0, 0.0], [9.0, 1.0, 2.0, 0.5, 3.0, 0.4, 9.0, 9.0]]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    idx = decode_victims(mass, 2, n_sink=1, recent=2, valid=valid)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [[[2, 4], [3, 5]]]


@pytest.mark.parametrize("n_sink, recent", [(0, 0), (1, 2), (3, 0), (0, 4)])
def test_decode_victims_without_padding_mask_equal_an_all_real_mask(n_sink: int, recent: int) -> None:
    """valid=None (the decode fast path of a layer without padding) chooses what an all-True mask chooses, and
    leaves the mass untouched (NaN and infinities included)."""
    gen = torch.Generator().manual_seed(n_sink * 10 + recent)
    mass = torch.rand(2, 3, 40, generator=gen)
    mass[0, 0, 5], mass[1, 2, 7], mass[0, 1, 30] = float("nan"), float("inf"), float("-inf")
    before = mass.clone()
    for n_evict in (1, 5):
        fast = decode_victims(mass, n_evict, n_sink, recent, None)
        masked = decode_victims(mass, n_evict, n_sink, recent, torch.ones(2, 40, dtype=torch.bool))
        assert torch.equal(fast, masked)
    assert torch.equal(mass.nan_to_num(), before.nan_to_num()) and mass.isnan().sum() == 1


def test_decode_victims_takes_padding_first_and_protects_real_sinks() -> None:
    mass = torch.tensor([[[7.0, 8.0, 0.0, 0.1, 5.0, 6.0, 0.0]]])
    valid = torch.tensor([[False, False, True, True, True, True, True]])
    idx = decode_victims(mass, 3, n_sink=1, recent=1, valid=valid)
    assert idx.tolist() == [[[0, 1, 3]]]  # both pads, then token 3; token 2 is the first real token (sink)


def test_decode_victims_rejects_evicting_protected_tokens() -> None:
    mass = torch.rand(1, 1, 6)
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert decode_victims(mass, 0, 1, 1, valid).shape == (1, 1, 0)
    with pytest.raises(ValueError, match="n_evict"):
        decode_victims(mass, 5, n_sink=1, recent=1, valid=valid)


@pytest.mark.parametrize("block_bytes", [1, 1000, 1 << 22])
def test_accumulated_mass_default_blocks_match_full_attention(block_bytes: int, monkeypatch) -> None:
    """Without `chunk`, blocks of queries are sized by MASS_BLOCK_BYTES of logits (one query per block up to all)."""
    import kvpress.presses.attention_mass as attention_mass

    monkeypatch.setattr(attention_mass, "MASS_BLOCK_BYTES", block_bytes)
    queries, keys, valid = make_inputs(2)
    for v in (valid, torch.ones_like(valid)):  # padded rows (masked path) and none (causal-only path)
        got = accumulate_attention_mass(queries, keys, 0.35, v, causal_offset=0)
        torch.testing.assert_close(got, reference_mass(queries, keys, 0.35, v, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pads", [(0, 0), (0, 5)])
def test_attention_with_mass_is_sdpa_and_the_mass_in_one_pass(pads):
    """H2O's first prefill chunk: the output equals causal SDPA over the chunk (left padding masked) and the mass
    equals accumulate_attention_mass, from one pass over the keys."""
    from kvpress.presses.attention_mass import attention_with_mass

    g = torch.Generator().manual_seed(3)
    batch, q_heads, kv_heads, n, d = 2, 6, 2, 37, 16
    q, k, v = (torch.randn(batch, h, n, d, generator=g) for h in (q_heads, kv_heads, kv_heads))
    valid = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]
    out, mass = attention_with_mass(q, k, v, 0.25, valid)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & valid[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=causal | ~valid[:, None, :, None], scale=0.25)
    real = valid[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert bool((out[~real] == 0).all())
    torch.testing.assert_close(mass, accumulate_attention_mass(q, k, 0.25, valid, 0), atol=1e-5, rtol=1e-5)


def test_h2o_prefill_in_one_pass_equals_sdpa_then_mass(monkeypatch):
    """Through the model: H2O's one-pass prefill (attention_with_mass) gives what SDPA + a separate mass pass give."""
    import kvpress
    from kvpress.presses.h2o import AttentionMass
    from tiny_models import left_padded_batch, tiny_model

    ids, mask = left_padded_batch(batch=2, length=40, pads=(0, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True, press="h2o:0.5")
    model = kvpress.wrap(tiny_model("llama"))
    calls = []
    real = kvpress.attention.attention_with_mass
    monkeypatch.setattr(kvpress.attention, "attention_with_mass", lambda *a: calls.append(1) or real(*a))
    one_pass = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(AttentionMass, "wants_prefill_mass", lambda self: False)
    two_passes = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert len(calls) == 2 and torch.equal(one_pass.sequences, two_passes.sequences)
    torch.testing.assert_close(torch.stack(one_pass.scores), torch.stack(two_passes.scores), atol=1e-4, rtol=1e-4)
