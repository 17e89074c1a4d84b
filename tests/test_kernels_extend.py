"""extend_attention: Q queries over all stored tokens (no causal mask). The twin equals plain float64 attention,
Triton (interpreted on CPU) equals the twin to 1e-4 with fp32 queries, and merging with attention over a new
chunk reproduces attention over the whole sequence.
"""
import math

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store, plain_attention

from kvpress.kernels.extend import extend_attention_reference, extend_attention_triton
from kvpress.kernels.merge import merge_attention_states

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
    out, lse = extend_attention_reference(q, *store.args(), sm_scale, *store.bits())
    expected_out, expected_lse = plain_attention(q, store, sm_scale)
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    store, q, sm_scale = _inputs(case, seed=5)
    out, lse = extend_attention_triton(q, *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = extend_attention_reference(q, *store.args(), sm_scale, *store.bits())
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())


def test_half_precision_queries_stay_close() -> None:
    store, q, sm_scale = _inputs("int8k-int4v-gqa8-q9-paged", seed=8)
    out, lse = extend_attention_triton(q.bfloat16(), *store.args(), sm_scale, *store.bits())
    ref_out, ref_lse = extend_attention_reference(q.bfloat16(), *store.args(), sm_scale, *store.bits())
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
    past_out, past_lse = impl(
        q.to(DEVICE), keys[:, :, :past].to(DEVICE), values[:, :, :past].to(DEVICE), None, None, None, None,
        torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.tensor([0], dtype=torch.int32, device=DEVICE),
        torch.tensor([past], dtype=torch.int32, device=DEVICE), sm_scale, 16, 16, None, None,
    )  # fmt: skip
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
    with pytest.raises(ValueError, match="extend q"):
        extend_attention_reference(q[:, :, 0], *store.args(), sm_scale, *store.bits())


# ----------------------------------------------------------------------------------------------------------
# chunk_attention: a prefill chunk over its own tokens, causally, after left padding (the kernel's CAUSAL mode)
# ----------------------------------------------------------------------------------------------------------
def _chunk_inputs(batch, kv_heads, group, length, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    return (t.to(dtype).to(DEVICE) for t in (q, k, v))


def _plain_causal(q, k, v, start, sm_scale):
    """Float64 oracle: query i sees keys start[b] <= j <= i; rows that see nothing give out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double().cpu() for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    length = q.shape[2]
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & (
        positions[None, None, None, :] >= start.cpu()[:, None, None, None])  # fmt: skip
    scores = (qd @ kd.transpose(-1, -2) * sm_scale).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    return probs @ vd, lse


@pytest.mark.parametrize("shape", [(3, 2, 4, 37, 32), (2, 1, 8, 70, 64), (1, 2, 1, 5, 128)])
def test_chunk_attention_twin_and_kernel_equal_plain_causal_attention(shape) -> None:
    from kvpress.kernels.extend import chunk_attention_reference, chunk_attention_triton

    batch, kv_heads, group, length, head_dim = shape
    q, k, v = _chunk_inputs(batch, kv_heads, group, length, head_dim, torch.float32, seed=sum(shape))
    start = torch.tensor([0, length // 3, length - 1][:batch], dtype=torch.int32, device=DEVICE)  # left padding
    sm_scale = head_dim**-0.5
    plain_out, plain_lse = _plain_causal(q, k, v, start, sm_scale)
    for impl, tol in ((chunk_attention_reference, 1e-5), (chunk_attention_triton, 1e-4)):
        out, lse = impl(q, k, v, start, sm_scale)
        assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
        torch.testing.assert_close(out.cpu().double(), plain_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.cpu().double(), plain_lse, atol=tol, rtol=tol)  # -inf for padding queries
    out, lse = chunk_attention_reference(q, k, v, None, sm_scale)  # None: no padding
    torch.testing.assert_close(out.cpu().double(), _plain_causal(q, k, v, torch.zeros(batch), sm_scale)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_chunk_attention_in_half_precision() -> None:
    from kvpress.kernels.extend import chunk_attention_reference, chunk_attention_triton

    q, k, v = _chunk_inputs(2, 2, 4, 33, 64, torch.float16, seed=7)
    start = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    ref_out, ref_lse = chunk_attention_reference(q, k, v, start, 0.125)
    out, lse = chunk_attention_triton(q, k, v, start, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


def test_chunk_attention_rejects_mismatched_chunks() -> None:
    from kvpress.kernels import chunk_attention

    q, k, v = _chunk_inputs(1, 1, 2, 8, 32, torch.float32, seed=8)
    with pytest.raises(ValueError, match="chunk k and v"):
        chunk_attention(q, k[:, :, :7], v[:, :, :7], None, 0.1)
    with pytest.raises(ValueError, match="extend q"):
        chunk_attention(q[:, :, 0], k, v, None, 0.1)


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


def test_chunked_prefill_attends_the_chunk_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A left-padded quantized batch prefilled in chunks (padding reaching into the second chunk) on the Triton
    path: later chunks go through chunk_attention, never the masked torch path, and the logits match the torch path
    (reference kernels: one SDPA over the dequantized past and the chunk)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import kvpress
    import kvpress.attention as attention
    from tiny_models import COMMON, left_padded_batch

    calls = []
    real = attention.chunk_attention
    monkeypatch.setattr(attention, "chunk_attention", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(attention, "_chunk_attention", lambda *a: pytest.fail("masked torch path taken"))
    torch.manual_seed(0)
    model = kvpress.wrap(AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "head_dim": 32})).eval())
    ids, mask = left_padded_batch(batch=2, length=24, pads=(0, 20))
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("KVPRESS_KERNELS", backend)
        cache = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2")
        with torch.no_grad():
            results[backend] = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                              max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                                              prefill_chunk_size=16, output_logits=True,
                                              return_dict_in_generate=True)  # fmt: skip
    assert len(calls) == model.config.num_hidden_layers  # the second chunk, once per layer, Triton run only
    assert [c.tolist() for c in calls] == [[0, 4]] * len(calls)  # row 1: 20 padding tokens, 4 in the second chunk
    assert torch.equal(results["triton"].sequences, results["reference"].sequences)
    for a, b in zip(results["triton"].logits, results["reference"].logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
