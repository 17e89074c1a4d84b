"""Tests of each press's score(): SnapKV against a direct full-softmax reference, and the simple presses."""
import pytest
import torch

from kvpress.presses import H2OPress, KnormPress, RandomPress, ScoringInputs, SnapKVPress, StreamingLLMPress


def reference_snapkv(
    queries: torch.Tensor, keys: torch.Tensor, sm_scale: float, valid: torch.Tensor, window: int, kernel: int
) -> torch.Tensor:
    """SnapKV written out directly: full softmax of the last `window` queries, mean over real window queries and the
    group's heads, then a centred average over the real tokens among each token's kernel neighbours."""
    batch, q_heads, _, _ = queries.shape
    kv_heads, n_tokens = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    last = queries[:, :, -window:].double()
    logits = last @ keys.double().repeat_interleave(group, dim=1).transpose(-1, -2) * sm_scale
    query_pos = torch.arange(n_tokens - window, n_tokens)
    allowed = (torch.arange(n_tokens)[None, :] <= query_pos[:, None])[None, None] & valid[:, None, None, :]
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    real_query = valid[:, query_pos]
    weights = weights * real_query[:, None, :, None]
    mean = weights.sum(dim=2) / real_query.sum(dim=1).clamp_min(1)[:, None, None]
    mean = mean.reshape(batch, kv_heads, group, n_tokens).mean(dim=2)
    pooled = torch.zeros_like(mean)
    for b in range(batch):
        for t in range(n_tokens):
            lo, hi = max(0, t - kernel // 2), min(n_tokens, t + kernel // 2 + 1)
            neighbours = [s for s in range(lo, hi) if valid[b, s]]
            if neighbours:
                pooled[b, :, t] = mean[b, :, neighbours].mean(dim=-1)
    return pooled.float()


@pytest.mark.parametrize("kernel", [1, 3])
def test_snapkv_matches_reference(kernel: int) -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 10, 4, generator=generator)
    queries = torch.randn(2, 4, 6, 4, generator=generator)  # more queries than the window: only the last 4 count
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    press = SnapKVPress(compression_ratio=0.5, window_size=4, kernel_size=kernel)
    got = press.score(ScoringInputs(keys, keys, valid, 0.5, queries=queries))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_snapkv(queries, keys, 0.5, valid, 4, kernel), rtol=1e-5, atol=1e-6)


def test_snapkv_hand_made_case_keeps_the_attended_token() -> None:
    # One head, D=1: the two window queries (positions 4, 5) strongly prefer key 1 (large positive key).
    keys = torch.tensor([0.0, 3.0, -1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 6, 1)
    queries = torch.tensor([2.0, 2.0]).reshape(1, 1, 2, 1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    press = SnapKVPress(compression_ratio=0.5, window_size=2, kernel_size=1)
    scores = press.score(ScoringInputs(keys, keys, valid, 1.0, queries=queries))
    # query at 4 sees keys 0..4: logits 0, 6, -2, 0, 0; query at 5 sees 0..5: 0, 6, -2, 0, 0, 0
    e = torch.tensor(6.0).exp()
    expected_key1 = 0.5 * (e / (e + torch.tensor(-2.0).exp() + 3) + e / (e + torch.tensor(-2.0).exp() + 4))
    assert scores[0, 0, 1].item() == pytest.approx(expected_key1.item(), rel=1e-5)
    idx = press.keep_indices(ScoringInputs(keys, keys, valid, 1.0, queries=queries))
    assert idx.tolist() == [[[1, 4, 5]]]  # key 1 plus the window (recent = window_size)


def test_snapkv_short_prompt_uses_all_queries_and_keeps_everything() -> None:
    keys = torch.randn(1, 1, 3, 4)
    queries = torch.randn(1, 2, 3, 4)
    valid = torch.ones(1, 3, dtype=torch.bool)
    press = SnapKVPress(compression_ratio=0.5, window_size=8)
    assert press.query_window == 8
    scores = press.score(ScoringInputs(keys, keys, valid, 0.5, queries=queries))
    torch.testing.assert_close(scores, reference_snapkv(queries, keys, 0.5, valid, 3, 5))
    assert press.n_keep(3) == 3


def test_snapkv_requires_queries_and_valid_sizes() -> None:
    keys = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="queries"):
        SnapKVPress().score(ScoringInputs(keys, keys, torch.ones(1, 5, dtype=torch.bool), 0.5))
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKVPress(kernel_size=4)
    with pytest.raises(ValueError, match="window_size"):
        SnapKVPress(window_size=0)


def test_h2o_scores_are_the_attention_mass() -> None:
    press = H2OPress(compression_ratio=0.5, recent=1)
    assert press.needs_attention_mass and press.query_window == 0
    assert not SnapKVPress.needs_attention_mass
    keys = torch.randn(1, 2, 5, 4)
    mass = torch.tensor([[[5.0, 0.0, 4.0, 1.0, 0.0], [0.0, 3.0, 0.0, 2.0, 0.0]]], dtype=torch.float64)
    valid = torch.ones(1, 5, dtype=torch.bool)
    scores = press.score(ScoringInputs(keys, keys, valid, 1.0, attention_mass=mass))
    assert scores.dtype == torch.float32 and torch.equal(scores, mass.float())
    kept = press.keep_indices(ScoringInputs(keys, keys, valid, 1.0, attention_mass=mass))
    assert kept.tolist() == [[[0, 2, 4], [1, 3, 4]]]
    with pytest.raises(ValueError, match="attention_mass"):
        press.score(ScoringInputs(keys, keys, valid, 1.0))
    with pytest.raises(ValueError, match="attention_mass"):
        press.score(ScoringInputs(keys, keys, valid, 1.0, attention_mass=mass[:, :1]))


def test_knorm_keeps_low_norm_keys() -> None:
    keys = torch.zeros(1, 1, 4, 2)
    keys[0, 0, :, 0] = torch.tensor([3.0, 1.0, 4.0, 2.0])
    valid = torch.ones(1, 4, dtype=torch.bool)
    press = KnormPress(compression_ratio=0.5)
    torch.testing.assert_close(press.score(ScoringInputs(keys, keys, valid, 1.0)), -keys[..., 0])
    assert press.keep_indices(ScoringInputs(keys, keys, valid, 1.0)).tolist() == [[[1, 3]]]


def test_random_is_deterministic_per_seed() -> None:
    keys = torch.randn(2, 2, 16, 4)
    valid = torch.ones(2, 16, dtype=torch.bool)
    first = RandomPress(compression_ratio=0.5, seed=1).score(ScoringInputs(keys, keys, valid, 1.0))
    again = RandomPress(compression_ratio=0.5, seed=1).score(ScoringInputs(keys, keys, valid, 1.0))
    other = RandomPress(compression_ratio=0.5, seed=2).score(ScoringInputs(keys, keys, valid, 1.0))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="seed"):
        RandomPress(seed=-1)


def test_streaming_scores_rank_later_tokens_higher() -> None:
    keys = torch.randn(1, 1, 5, 2)
    scores = StreamingLLMPress().score(ScoringInputs(keys, keys, torch.ones(1, 5, dtype=torch.bool), 1.0))
    assert scores.tolist() == [[[0.0, 1.0, 2.0, 3.0, 4.0]]]
    assert StreamingLLMPress().n_sink == 4


@pytest.mark.parametrize("press", [KnormPress(), StreamingLLMPress(), RandomPress(), H2OPress()])
def test_presses_reject_bad_valid_mask(press) -> None:
    keys = torch.randn(1, 1, 5, 2)
    with pytest.raises(ValueError, match="valid"):
        valid = torch.ones(1, 4, dtype=torch.bool)
        press.score(ScoringInputs(keys, keys, valid, 1.0, attention_mass=torch.zeros(1, 1, 5)))
