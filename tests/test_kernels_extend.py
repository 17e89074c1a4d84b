"""extend_attention_multi: Q queries over all stored tokens of a store (no causal mask), then with the chunk itself
as a causal store. The twin equals plain float64 attention,
Triton (interpreted on CPU) equals the twin to 1e-4 with fp32 queries, and merging with attention over a new
chunk reproduces attention over the whole sequence.
"""
import math
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

import kvpress.kernels as kernels
from kvpress.kernels import KVStore, chunk_store
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.multi import extend_attention_multi_triton
from kvpress.kernels.reference import extend_attention_multi_reference


def extend_attention_reference(q, store, sm_scale):
    """One store through the multi-store twin."""
    return extend_attention_multi_reference(q, (store,), sm_scale)


def extend_attention_triton(q, store, sm_scale):
    """One store through the multi-store kernel."""
    return extend_attention_multi_triton(q, (store,), sm_scale)

# (kv_heads, group, num_queries, head_dim, k_bits, v_bits, k_group, v_group, store dtype, page_size)
CASES = {
    "fp32-gqa1-q5-contiguous": (2, 1, 5, 64, 16, 16, None, None, torch.float32, None),
    "fp16-gqa4-q3-paged": (1, 4, 3, 64, 16, 16, None, None, torch.float16, 16),
    "int8k-int4v-gqa8-q9-paged": (1, 8, 9, 64, 8, 4, 16, 32, torch.float32, 16),
    "int8k-int4v-gqa4-q2-d128-contiguous": (2, 4, 2, 128, 8, 4, 32, 32, torch.float32, None),
}
RAGGED = ([0, 9, 4], [45, 70, 4])  # row 2 holds no stored tokens


def _inputs(case: str, seed: int = 0):
    kv_heads, group, num_queries, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size = CASES[case]
    store = make_store(*RAGGED, kv_heads, head_dim, k_bits, v_bits, k_group, v_group, dtype, page_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(RAGGED[0]), kv_heads * group, num_queries, head_dim, generator=gen)
    return store, q.to(DEVICE), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_plain_attention(case: str) -> None:
    store, q, sm_scale = _inputs(case)
    out, lse = extend_attention_reference(q, store, sm_scale)
    expected_out, expected_lse = plain_attention(q, store, sm_scale)
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, sm_scale = _inputs(case, seed=5)
    out, lse = extend_attention_triton(q, store, sm_scale)
    ref_out, ref_lse = extend_attention_reference(q, store, sm_scale)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())


def test_half_precision_queries_stay_close() -> None:
    store, q, sm_scale = _inputs("int8k-int4v-gqa8-q9-paged", seed=8)
    out, lse = extend_attention_triton(q.bfloat16(), store, sm_scale)
    ref_out, ref_lse = extend_attention_reference(q.bfloat16(), store, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", [extend_attention_reference, extend_attention_triton])
def test_store_attention_merged_with_causal_chunk_equals_full_causal_attention(impl) -> None:
    kv_heads, group, past, chunk, head_dim = 2, 2, 30, 6, 64
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, kv_heads, past + chunk, head_dim, generator=gen)
    values = torch.randn(1, kv_heads, past + chunk, head_dim, generator=gen)
    q = torch.randn(1, kv_heads * group, chunk, head_dim, generator=gen)
    sm_scale = 0.125
    store = KVStore(k=keys[:, :, :past].to(DEVICE), v=values[:, :, :past].to(DEVICE),
                    block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                    kv_start=torch.tensor([0], dtype=torch.int32, device=DEVICE),
                    kv_end=torch.tensor([past], dtype=torch.int32, device=DEVICE))
    past_out, past_lse = impl(q.to(DEVICE), store, sm_scale)
    new_k = keys[:, :, past:].repeat_interleave(group, 1)
    new_v = values[:, :, past:].repeat_interleave(group, 1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    scores = (q @ new_k.transpose(-1, -2) * sm_scale).masked_fill(~causal, -math.inf)
    chunk_lse = torch.logsumexp(scores, -1)
    chunk_out = torch.softmax(scores, -1) @ new_v
    out, lse = merge_attention_states(past_out.cpu(), past_lse.cpu(), chunk_out, chunk_lse)

    full_k = keys.repeat_interleave(group, 1)
    full_v = values.repeat_interleave(group, 1)
    full_mask = torch.ones(chunk, past + chunk, dtype=torch.bool).tril(diagonal=past)
    full_scores = (q @ full_k.transpose(-1, -2) * sm_scale).masked_fill(~full_mask, -math.inf)
    torch.testing.assert_close(out, torch.softmax(full_scores, -1) @ full_v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(full_scores, -1), atol=1e-4, rtol=1e-4)


def test_decode_shaped_query_is_rejected() -> None:
    store, q, sm_scale = _inputs("fp32-gqa1-q5-contiguous")
    with pytest.raises(ValueError, match=r"\(B, Hq, Q, D\)"):
        extend_attention_reference(q[:, :, 0], store, sm_scale)


# ----------------------------------------------------------------------------------------------------------
# The chunk as a causal store of the multi-store kernels (extend_attention_multi): alone, and after stored tokens
# ----------------------------------------------------------------------------------------------------------
def _chunk_inputs(batch, kv_heads, group, length, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    return (t.to(dtype).to(DEVICE) for t in (q, k, v))


def _plain_causal(q, k, v, start, sm_scale, past_k=None, past_v=None, past_start=None):
    """Float64 oracle: query i sees the past keys from past_start[b] and chunk keys start[b] <= j <= i; rows that
    see nothing give out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    length, n_past = q.shape[2], 0 if past_k is None else past_k.shape[2]
    keys = k if past_k is None else torch.cat([past_k.to(k.dtype), k], dim=2)
    values = v if past_v is None else torch.cat([past_v.to(v.dtype), v], dim=2)
    qd, kd, vd = (t.double().cpu() for t in (q, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)))
    positions = torch.arange(length)
    chunk = (positions[None, :] <= positions[:, None])[None, None] & (
        positions[None, None, None, :] >= start.cpu()[:, None, None, None])  # fmt: skip
    past = torch.arange(n_past)[None, None, None, :] >= (
        torch.zeros(q.shape[0], dtype=torch.long) if past_start is None else past_start.cpu())[:, None, None, None]
    allowed = torch.cat([past.expand(-1, 1, length, n_past), chunk.expand(q.shape[0], 1, length, length)], dim=-1)
    scores = (qd @ kd.transpose(-1, -2) * sm_scale).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    return probs @ vd, lse


IMPLS = {"twin": extend_attention_multi_reference, "triton": extend_attention_multi_triton}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(3, 2, 4, 37, 32), (2, 1, 8, 70, 64), (1, 2, 1, 5, 128)])
def test_causal_chunk_store_equals_plain_causal_attention(impl, shape) -> None:
    batch, kv_heads, group, length, head_dim = shape
    q, k, v = _chunk_inputs(batch, kv_heads, group, length, head_dim, torch.float32, seed=sum(shape))
    start = torch.tensor([0, length // 3, length - 1][:batch], dtype=torch.int32, device=DEVICE)  # left padding
    sm_scale = head_dim**-0.5
    out, lse = IMPLS[impl](q, (chunk_store(k, v, start),), sm_scale)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    plain_out, plain_lse = _plain_causal(q, k, v, start, sm_scale)
    tol = 1e-5 if impl == "twin" else 1e-4
    torch.testing.assert_close(out.cpu().double(), plain_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), plain_lse, atol=tol, rtol=tol)  # -inf for padding queries
    out, _ = IMPLS[impl](q, (chunk_store(k, v, None),), sm_scale)  # None: no padding
    torch.testing.assert_close(out.cpu().double(), _plain_causal(q, k, v, torch.zeros(batch), sm_scale)[0],
                               atol=tol, rtol=tol)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_one_call_over_quantized_past_and_causal_chunk(impl) -> None:
    """A quantized paged past (ragged starts: left padding) and the chunk (causal, padding reaching into it for
    row 2) in one call, split over the stores, equal plain attention over the dense past + chunk."""
    kv_heads, group, length, head_dim = 2, 4, 21, 64
    past = make_store([0, 9, 4], [45, 45, 45], kv_heads, head_dim, 8, 4, 16, 32, torch.float32, 16, seed=3)
    q, k, v = _chunk_inputs(3, kv_heads, group, length, head_dim, torch.float32, seed=4)
    start = torch.tensor([0, 0, 6], dtype=torch.int32, device=DEVICE)
    past_start = past.kv_start.clone()
    past_start[2] = 45  # row 2 is all padding in the past: its first real token is in the chunk
    stores = (replace(past, kv_start=past_start.to(DEVICE)), chunk_store(k, v, start))
    out, lse = IMPLS[impl](q, stores, 0.125)
    dense_k, dense_v = past.dense_k[:, :, :45], past.dense_v[:, :, :45]  # the dense tokens beyond kv_end: capacity
    plain_out, plain_lse = _plain_causal(q, k, v, start, 0.125, dense_k, dense_v, past_start)
    torch.testing.assert_close(out.cpu().double(), plain_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), plain_lse, atol=1e-4, rtol=1e-4)


def test_causal_chunk_in_half_precision() -> None:
    q, k, v = _chunk_inputs(2, 2, 4, 33, 64, torch.float16, seed=7)
    stores = (chunk_store(k, v, torch.tensor([0, 3], device=DEVICE)),)
    ref_out, ref_lse = extend_attention_multi_reference(q, stores, 0.125)
    out, lse = extend_attention_multi_triton(q, stores, 0.125, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


def test_multi_store_extend_arguments_are_checked() -> None:
    q, k, v = _chunk_inputs(1, 1, 2, 8, 32, torch.float32, seed=8)
    with pytest.raises(ValueError, match="chunk k and v"):
        chunk_store(k, v[:, :, :7], None)
    with pytest.raises(ValueError, match="causal must be a bool"):
        kernels.extend_attention_multi(q, (replace(chunk_store(k, v, None), causal=1),), 0.1)
    with pytest.raises(ValueError, match="for decode"):
        extend_attention_multi_triton(q, (chunk_store(k, v, None),), 0.1, scores=torch.zeros(1, 2, 8),
                                     score_offsets=(0,))  # fmt: skip


def test_only_plain_causal_masks_take_the_kernel_path() -> None:
    """attention._causal_chunk: no mask, or causal after left padding -> the kernel; a sliding window or any other
    mask (here: one extra hidden key) -> the masked torch path."""
    from kvpress.attention import _causal_chunk, _chunk_validity

    length = 6
    positions = torch.arange(length)
    pads = torch.tensor([0, 2])
    mask = (positions[None, :] <= positions[:, None])[None, None] & (positions[None, None, None, :] >= pads[:, None,
                                                                                                            None, None])
    assert _causal_chunk(None, None, None) == (True, None)
    assert _causal_chunk(None, None, 4) == (False, None)
    causal, start = _causal_chunk(mask, _chunk_validity(mask), None)
    assert causal and start.tolist() == [0, 2]
    other = mask.clone()
    other[0, 0, 5, 3] = False
    assert _causal_chunk(other, _chunk_validity(other), None)[0] is False
    additive = torch.zeros(2, 1, length, length).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert _causal_chunk(additive, _chunk_validity(additive), None)[0] is True


def test_chunked_prefill_is_one_kernel_call_per_layer_and_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A left-padded quantized batch prefilled in chunks (padding reaching into the second chunk) on the Triton
    path: each later chunk is one extend_attention_multi call per layer over the stored segments + the causal
    chunk (never the masked torch path), and the logits match the torch path (reference kernels: one SDPA over
    the dequantized past and the chunk)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import kvpress
    import kvpress.attention as attention
    from tiny_models import COMMON, left_padded_batch

    calls = []
    real = attention.extend_attention_multi
    monkeypatch.setattr(attention, "extend_attention_multi", lambda q, stores, *a, **k: calls.append(
        (len(stores), tuple(s.causal for s in stores), stores[-1].kv_start.tolist())) or real(q, stores, *a, **k))
    monkeypatch.setattr(attention, "_chunk_attention", lambda *a: pytest.fail("masked torch path taken"))
    torch.manual_seed(0)
    model = kvpress.wrap(AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "head_dim": 32})).eval())
    ids, mask = left_padded_batch(batch=2, length=24, pads=(0, 20))
    results = {}
    for backend in ("triton", "reference"):
        cache = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2")
        with torch.no_grad(), kernels.use_backend(backend):
            results[backend] = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                              max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                                              prefill_chunk_size=16, output_logits=True,
                                              return_dict_in_generate=True)  # fmt: skip
    # the second chunk, once per layer, Triton run only: the stored segments, then the chunk, causal (row 1: 20
    # padding tokens, 4 of them in the second chunk)
    assert len(calls) == model.config.num_hidden_layers
    for n_stores, causal, chunk_start in calls:
        assert n_stores >= 2 and causal == (False,) * (n_stores - 1) + (True,) and chunk_start == [0, 4]
    assert torch.equal(results["triton"].sequences, results["reference"].sequences)
    for a, b in zip(results["triton"].logits, results["reference"].logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
