"""decode_attention_multi: one query per row over several stores in one split-K launch + one combine launch.

The torch twin equals (a) the one-store twin per store merged pairwise with merge_attention_states and (b)
plain float64 attention over the concatenation of every store's dense tokens; the Triton kernel (interpreted on CPU)
equals the twin. Stores mimic a quantized layer: fp16 sinks, an int8-K / int4-V middle, an fp16 window (GQA 4:1,
ragged rows: row 1 has an empty sink span, row 2 an empty middle), contiguous (block table (B, 1), row b -> page b)
or paged, plus a paged quantized "shared prefix" as a fourth store. Tolerances as in test_kernels_decode.py.
"""
import math
from dataclasses import replace

import pytest
import torch
from test_kernels_fixtures import DEVICE, make_store

import kvpress.kernels as kernels
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.multi import decode_attention_multi_triton, multi_split_counts
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.store import MAX_STORES

HEAD_DIM, KV_HEADS, GROUP = 32, 1, 4  # GQA 4:1; head_dim 32 is the smallest the Triton kernels take
# per store: (kv_start, kv_end) of the 4 rows
SINK = ([0, 4, 1, 0], [4, 4, 4, 3])  # row 1: empty sink span (all padding)
MIDDLE = ([0, 0, 0, 6], [37, 70, 0, 51])  # row 2: empty middle
WINDOW = ([0, 0, 2, 0], [9, 9, 9, 9])
PREFIX = ([0, 3, 0, 16], [32, 20, 5, 16])  # row 3: empty


def _stores(v_group, page_size=None, prefix=False, seed=0):
    """The fixture's stores (fixture Store objects): sinks, middle, window [, prefix]."""
    sink = make_store(*SINK, KV_HEADS, HEAD_DIM, dtype=torch.float16, seed=seed)
    middle = make_store(*MIDDLE, KV_HEADS, HEAD_DIM, 8, 4, HEAD_DIM, v_group or HEAD_DIM, torch.float32, page_size,
                        seed + 1)  # fmt: skip
    middle = replace(middle, k_group=None, v_group=v_group)  # None: one group per token, passed through
    window = make_store(*WINDOW, KV_HEADS, HEAD_DIM, dtype=torch.float16, seed=seed + 2)
    stores = [sink, middle, window]
    if prefix:
        stores.append(make_store(*PREFIX, KV_HEADS, HEAD_DIM, 8, 4, 16, 16, torch.float32, 16, seed + 3))
    return stores


def _args(stores) -> tuple:
    return tuple(stores)


def _query(dtype=torch.float32, seed=1):
    q = torch.randn(len(SINK[0]), KV_HEADS * GROUP, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    return q.to(dtype).to(DEVICE)


def _per_store_then_merge(q, stores, sm_scale):
    """Independent oracle: one decode_attention_reference per store, merged pairwise."""
    out, lse = None, None
    for s in stores:
        o, l = decode_attention_multi_reference(q, (s,), sm_scale)
        out, lse = (o, l) if out is None else merge_attention_states(out, lse, o, l)
    return out, lse


def _plain_over_concatenation(q, stores, sm_scale):
    """Float64 softmax attention of each row over the union of its spans in every store (dense tokens)."""
    batch, q_heads, _ = q.shape
    out = torch.zeros(batch, q_heads, HEAD_DIM, dtype=torch.float64)
    lse = torch.full((batch, q_heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        keys = torch.cat([s.dense_k[b, :, int(s.kv_start[b]) : int(s.kv_end[b])] for s in stores], dim=1)
        values = torch.cat([s.dense_v[b, :, int(s.kv_start[b]) : int(s.kv_end[b])] for s in stores], dim=1)
        keys, values = keys.repeat_interleave(GROUP, 0), values.repeat_interleave(GROUP, 0)  # (Hq, T, D)
        scores = torch.einsum("hd,htd->ht", q[b].double().cpu(), keys) * sm_scale
        lse[b] = torch.logsumexp(scores, -1)
        out[b] = torch.einsum("ht,htd->hd", torch.softmax(scores, -1), values)
    return out, lse


CASES = {  # v_group, page_size of the middle, with a 4th (prefix) store
    "contiguous-vNone": (None, None, False),
    "contiguous-v16": (16, None, False),
    "contiguous-v8": (8, None, False),
    "paged-v16-prefix": (16, 16, True),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_per_store_merge_and_plain_attention(case: str) -> None:
    v_group, page_size, prefix = CASES[case]
    stores = _stores(v_group, page_size, prefix)
    q, sm_scale = _query(), HEAD_DIM**-0.5
    out, lse = decode_attention_multi_reference(q, _args(stores), sm_scale)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:2]
    ref_out, ref_lse = _per_store_then_merge(q, stores, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    plain_out, plain_lse = _plain_over_concatenation(q, stores, sm_scale)
    torch.testing.assert_close(out.cpu().double(), plain_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), plain_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case: str) -> None:
    v_group, page_size, prefix = CASES[case]
    stores = _stores(v_group, page_size, prefix, seed=5)
    q, sm_scale = _query(seed=6), HEAD_DIM**-0.5
    out, lse = decode_attention_multi_triton(q, _args(stores), sm_scale)
    ref_out, ref_lse = decode_attention_multi_reference(q, _args(stores), sm_scale)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [(1, 1, 1), (2, 5, 3)])  # (2, 5, 3): empty splits, ragged shares
def test_split_counts_do_not_change_the_result(num_splits) -> None:
    stores = _stores(16, seed=9)
    q, sm_scale = _query(seed=10), 0.3
    out, lse = decode_attention_multi_triton(q, _args(stores), sm_scale, num_splits=num_splits)
    ref_out, ref_lse = _per_store_then_merge(q, stores, sm_scale)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_half_queries_and_half_output() -> None:
    stores = _stores(8, seed=11)
    q = _query(torch.float16, seed=12)
    out, lse = decode_attention_multi_triton(q, _args(stores), 0.2, out_dtype=torch.float16)
    ref_out, ref_lse = decode_attention_multi_reference(q, _args(stores), 0.2)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_int_bounds_and_unclamped_starts() -> None:
    """Ints stand for the same bound in every row; starts are clamped into [0, end] (the layer passes
    kv_start - offset as is): the result equals the same stores with explicit clamped (B,) bounds."""
    sink, middle, window = _stores(16, seed=13)
    q = _query(seed=14)
    layer_start = torch.tensor([0, 9, 2, 70], dtype=torch.int32, device=DEVICE)  # in the middle's coordinates + 4
    stores = (
        replace(sink, kv_start=0, kv_end=4),
        replace(middle, kv_start=layer_start - 4, kv_end=60),  # -4 -> 0, 66 -> 60 (empty)
        replace(window, kv_start=3, kv_end=9),
    )
    explicit = [
        replace(s, kv_start=torch.tensor(start, dtype=torch.int32, device=DEVICE),
                kv_end=torch.full((4,), end, dtype=torch.int32, device=DEVICE))
        for s, start, end in ((sink, [0] * 4, 4), (middle, [0, 5, 0, 60], 60), (window, [3] * 4, 9))
    ]  # fmt: skip
    ref_out, ref_lse = _per_store_then_merge(q, explicit, 0.25)
    for impl in (decode_attention_multi_reference, decode_attention_multi_triton):
        out, lse = impl(q, stores, 0.25)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_rows_empty_in_every_store_give_zero_and_minus_inf() -> None:
    sink = make_store([0, 2], [2, 2], KV_HEADS, HEAD_DIM, dtype=torch.float16)
    middle = make_store([0, 0], [20, 0], KV_HEADS, HEAD_DIM, 8, 4, 16, 16, seed=1)
    q = torch.randn(2, GROUP, HEAD_DIM, device=DEVICE)
    for impl in (decode_attention_multi_reference, decode_attention_multi_triton):
        out, lse = impl(q, _args([sink, middle]), 0.2)
        assert bool((out[1] == 0).all()) and bool((lse[1] == -math.inf).all())
        assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(lse[0]).all())


def test_split_counts_follow_capacity() -> None:
    assert multi_split_counts([4, 4096, 144], 4, 64, 1056) == [1, 16, 1]  # at most one split per 4 * block_n
    assert multi_split_counts([4, 100_000, 144], 1, 64, 1056) == [1, 62, 1]  # total capped at 64
    assert multi_split_counts([4, 4096, 144], 64, 64, 8) == [1, 1, 1]  # enough programs already: one each


def test_dispatch_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    stores = _stores(16, seed=15)
    q = _query(seed=16)
    for backend in ("reference", "triton"):
        calls = []
        name = f"decode_attention_multi_{backend}"
        real = getattr(kernels.dispatch, name)
        monkeypatch.setattr(kernels.dispatch, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
        with kernels.use_backend(backend):
            kernels.decode_attention_multi(q, _args(stores[:1]), 0.2)
        assert calls == [1]
    with pytest.raises(ValueError, match="1 to 5 stores"):
        decode_attention_multi_reference(q, _args(stores) * 2, 0.2)
    assert MAX_STORES == 5
    with pytest.raises(ValueError, match="must be a KVStore"):
        decode_attention_multi_reference(q, ((stores[0].k, stores[0].v),), 0.2)
    with pytest.raises(ValueError, match="int >= 0"):
        decode_attention_multi_reference(q, (replace(stores[0], kv_start=-1, kv_end=4),), 0.2)
    with pytest.raises(ValueError, match="decode q"):
        decode_attention_multi_reference(q[:, :, None], _args(stores), 0.2)
    with pytest.raises(ValueError, match="one count >= 1 per store"):
        decode_attention_multi_triton(q, _args(stores), 0.2, num_splits=(1, 1))


# ----------------------------------------------------------------------------------------------------------
# In the model: the decode step of a quantized layer makes one decode_attention_multi call per layer, H2O included
# (its logits come from the same call).
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("press", [None, "h2o:0.0:max_tokens=24,recent=4"])
def test_fused_decode_is_one_call_per_step_and_layer(monkeypatch: pytest.MonkeyPatch, press) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import kvpress
    import kvpress.attention
    from tiny_models import COMMON, left_padded_batch

    calls: list[int] = []
    real = kvpress.attention.decode_attention_multi
    monkeypatch.setattr(kvpress.attention, "decode_attention_multi",
                        lambda q, stores, *a, **k: calls.append(len(stores)) or real(q, stores, *a, **k))
    torch.manual_seed(0)
    model = kvpress.wrap(AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "head_dim": 32})).eval())
    ids, mask = left_padded_batch(batch=2, length=24, pads=(0, 5))
    cache = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2", press=press)
    with torch.no_grad(), kernels.use_backend("reference"):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=20, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    # over the 3 segments (H2O's bound may empty the quantized middle: the padded batch's fp sinks are widened by
    # its padding)
    assert len(calls) == 19 * 2 and 3 in calls and set(calls) <= ({3} if press is None else {2, 3})


# ----------------------------------------------------------------------------------------------------------
# Logit output for H2O (scores=): the tokens' log2-domain logits, written from the tiles the kernel holds, and
# add_score_mass turning them into the step's attention mass.
# ----------------------------------------------------------------------------------------------------------
SENTINEL = 123.0


def _score_layout(stores) -> tuple[tuple[int, ...], int]:
    """Column offsets of the stores in one (B, Hq, L) buffer (each store gets its capacity) and L."""
    offsets, length = [], 0
    for s in stores:
        offsets.append(length)
        length += int(s.kv_end.max())
    return tuple(offsets), length


def _dense_logits_and_probs(q, stores, sm_scale, offsets, length):
    """Float64 oracle: (B, Hq, L) log2-domain logits (NaN where no row attends) and softmax probabilities over
    the concatenation of every store's span (0 elsewhere)."""
    batch, q_heads, _ = q.shape
    logits = torch.full((batch, q_heads, length), math.nan, dtype=torch.float64)
    for s, off in zip(stores, offsets):
        keys = s.dense_k.repeat_interleave(GROUP, 1)  # (B, Hq, T, D)
        raw = torch.einsum("bhd,bhtd->bht", q.double().cpu(), keys[:, :, : length - off]) * sm_scale * math.log2(math.e)
        for b in range(batch):
            lo, hi = int(s.kv_start[b]), int(s.kv_end[b])
            logits[b, :, off + lo : off + hi] = raw[b, :, lo:hi]
    probs = torch.exp2(logits - torch.logsumexp(torch.nan_to_num(logits, nan=-math.inf) / math.log2(math.e), -1,
                                                keepdim=True) * math.log2(math.e))  # fmt: skip
    return logits, torch.nan_to_num(probs, nan=0.0)


@pytest.mark.parametrize("case", CASES)
def test_score_output_of_the_twin_and_the_kernel(case: str) -> None:
    v_group, page_size, prefix = CASES[case]
    stores = _stores(v_group, page_size, prefix, seed=21)
    q, sm_scale = _query(seed=22), HEAD_DIM**-0.5
    offsets, length = _score_layout(stores)
    oracle, _ = _dense_logits_and_probs(q, stores, sm_scale, offsets, length)
    written = ~oracle.isnan()
    results = {}
    for name, impl in (("twin", decode_attention_multi_reference), ("triton", decode_attention_multi_triton)):
        scores = torch.full((q.shape[0], q.shape[1], length), SENTINEL, device=DEVICE)
        out, lse = impl(q, _args(stores), sm_scale, scores=scores, score_offsets=offsets)
        ref_out, ref_lse = decode_attention_multi_reference(q, _args(stores), sm_scale)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)  # the output is unchanged by the option
        assert torch.all(scores.cpu()[~written] == SENTINEL)  # columns no row attends are left alone
        torch.testing.assert_close(scores.cpu().double()[written], oracle[written], atol=1e-4, rtol=1e-4)
        results[name] = scores
    torch.testing.assert_close(results["triton"], results["twin"], atol=1e-4, rtol=1e-4)


def test_score_mass_equals_the_attention_probabilities() -> None:
    """Logits written into a -inf buffer, turned into mass with the final lse: the float64 softmax summed over
    each kv group's query heads; the Triton mass kernel equals the twin."""
    from kvpress.kernels.mass import add_score_mass_reference, add_score_mass_triton

    stores = _stores(16, 16, True, seed=23)
    q, sm_scale = _query(seed=24), HEAD_DIM**-0.5
    offsets, length = _score_layout(stores)
    scores = torch.full((q.shape[0], q.shape[1], length), -math.inf, device=DEVICE)
    _, lse = decode_attention_multi_reference(q, _args(stores), sm_scale, scores=scores, score_offsets=offsets)
    _, probs = _dense_logits_and_probs(q, stores, sm_scale, offsets, length)
    expected = probs.view(q.shape[0], KV_HEADS, GROUP, length).sum(2) + 1.0
    for impl in (add_score_mass_reference, add_score_mass_triton):
        mass = torch.ones(q.shape[0], KV_HEADS, length, device=DEVICE)
        assert impl(mass, scores, lse, None) is mass  # in place
        torch.testing.assert_close(mass.cpu().double(), expected, atol=1e-5, rtol=1e-5)


def test_score_mass_skips_left_padding_and_rows_that_attended_nothing() -> None:
    from kvpress.kernels.mass import add_score_mass_reference, add_score_mass_triton

    gen = torch.Generator().manual_seed(25)
    batch, kv_heads, group, length = 3, 2, 3, 300  # group 3: padded to 4 heads in the kernel; 2 token blocks
    scores = torch.randn(batch, kv_heads * group, length, generator=gen).to(DEVICE)
    lse = (torch.randn(batch, kv_heads * group, generator=gen) + 3).to(DEVICE)
    lse[2, :group] = -math.inf  # a (row, kv head) that attended nothing adds nothing
    kv_start = torch.tensor([0, 7, 299], device=DEVICE)
    scores[1, :, :7] = math.nan  # padding columns are never written by the decode: must not be read
    mass0 = torch.rand(batch, kv_heads, length, generator=gen).to(DEVICE)
    results = [impl(mass0.clone(), scores, lse, kv_start) for impl in (add_score_mass_reference, add_score_mass_triton)]
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    expected = mass0.double() + torch.exp2(scores.double() - lse.double()[..., None] * math.log2(math.e)).view(
        batch, kv_heads, group, length).sum(2)  # fmt: skip
    expected[1, :, :7] = mass0[1, :, :7].double()
    expected[2, :, :299] = mass0[2, :, :299].double()
    expected[2, 0] = mass0[2, 0].double()
    torch.testing.assert_close(results[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_score_arguments_are_checked() -> None:
    stores = _stores(16, seed=26)
    q = _query(seed=27)
    offsets, length = _score_layout(stores)
    with pytest.raises(ValueError, match="float32"):
        kernels.decode_attention_multi(q, _args(stores), 0.3, scores=torch.zeros(4, 4, length, dtype=torch.float16),
                                       score_offsets=offsets)  # fmt: skip
    with pytest.raises(ValueError, match="one int >= 0 per store"):
        kernels.decode_attention_multi(q, _args(stores), 0.3, scores=torch.zeros(4, 4, length), score_offsets=(0,))
    with pytest.raises(ValueError, match="without a scores"):
        kernels.decode_attention_multi(q, _args(stores), 0.3, score_offsets=offsets)
    with pytest.raises(ValueError, match="do not match"):
        kernels.add_score_mass(torch.zeros(4, 1, 5), torch.zeros(4, 4, 6), torch.zeros(4, 4), None)


# ----------------------------------------------------------------------------------------------------------
# Launch plans (kernels/launch_plans.py): a decode step re-launches the same stores with new bounds.
# ----------------------------------------------------------------------------------------------------------
def test_repeated_launches_reuse_one_plan_and_follow_every_call() -> None:
    """Same store tensors, new int ends, moved logit offsets and a longer logit buffer at every call (as decode
    steps): one plan, and every call equals the twin; a replaced store tensor gets a new plan; bounds are still
    checked on a hit."""
    from kvpress.kernels.launch_plans import cached_plans, clear_plans

    stores = _stores(16, seed=31)
    q, sm_scale = _query(seed=32), HEAD_DIM**-0.5
    base = list(_args(stores))
    clear_plans()
    for step, window_end in enumerate((5, 7, 9)):
        window = replace(base[2], kv_start=0, kv_end=window_end)  # int bounds: rows share them
        args = (base[0], base[1], window)
        offsets, length = _score_layout(stores)
        offsets = (offsets[0], offsets[1] + step, offsets[2] + step)  # as when a segment before them grows
        length += step  # the logit buffer grows between calls, so do its strides
        results = []
        for impl in (decode_attention_multi_triton, decode_attention_multi_reference):
            scores = torch.full((q.shape[0], q.shape[1], length), -math.inf, device=DEVICE)
            results.append((*impl(q, args, sm_scale, scores=scores, score_offsets=offsets), scores))
        for got, want in zip(results[0], results[1]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cached_plans() == 1
    replaced = (base[0], replace(base[1], k=base[1].k.clone()), window)  # a store that grew: new tensors
    out, _ = decode_attention_multi_triton(q, replaced, sm_scale)
    torch.testing.assert_close(out, decode_attention_multi_reference(q, replaced, sm_scale)[0], atol=1e-4, rtol=1e-4)
    assert cached_plans() == 2  # the replaced store's (without logits) beside the first
    with pytest.raises(ValueError, match="int >= 0"):
        decode_attention_multi_triton(q, (base[0], base[1], replace(window, kv_end=-1)), sm_scale)


def test_nothing_to_attend_launches_nothing() -> None:
    """No query heads: empty outputs (no plan, no launch), the same from the twin."""
    stores = _stores(16, seed=33)
    q = _query(seed=34)[:, :0]
    for impl in (decode_attention_multi_triton, decode_attention_multi_reference):
        out, lse = impl(q, _args(stores), 0.3)
        assert out.shape == (4, 0, HEAD_DIM) and lse.shape == (4, 0)
