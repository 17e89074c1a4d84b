"""Tests of the press budget arithmetic (n_keep), field validation and the shared selection helper."""
import pytest
import torch

from kvpress.presses import (BasePress, KnormPress, ScoringInputs, SnapKVPress, StreamingLLMPress, forced_keep_mask,
                             select_indices)


def test_n_keep_rounds_up_and_ratio_zero_keeps_all() -> None:
    assert KnormPress(compression_ratio=0.0).n_keep(10) == 10
    assert KnormPress(compression_ratio=0.5).n_keep(10) == 5
    assert KnormPress(compression_ratio=0.5).n_keep(11) == 6  # ceil(5.5)
    assert KnormPress(compression_ratio=0.7).n_keep(10) == 3  # float error (3.0000000000000004) must not round up
    assert KnormPress(compression_ratio=0.99).n_keep(10) == 1  # ceil(0.1)
    assert KnormPress(compression_ratio=0.9).n_keep(0) == 0


def test_n_keep_cap_and_floor() -> None:
    assert KnormPress(compression_ratio=0.0, max_tokens=8).n_keep(100) == 8
    assert KnormPress(compression_ratio=0.0, max_tokens=8).n_keep(5) == 5
    press = KnormPress(compression_ratio=0.9, n_sink=4, recent=6)
    assert press.n_keep(50) == 10  # ceil(5) raised to n_sink + recent
    assert press.n_keep(7) == 7  # never more than the prompt
    with pytest.raises(ValueError, match="n_tokens"):
        press.n_keep(-1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(compression_ratio=-0.1), "compression_ratio"),
        (dict(compression_ratio=float("nan")), "compression_ratio"),
        (dict(compression_ratio="0.5"), "compression_ratio"),
        (dict(max_tokens=4, n_sink=2, recent=2), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n_sink=-1), "n_sink"),
        (dict(recent=1.5), "recent"),
    ],
)
def test_invalid_budgets_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnormPress(**kwargs)


def test_smallest_valid_max_tokens_is_accepted() -> None:
    assert KnormPress(max_tokens=5, n_sink=2, recent=2).n_keep(100) == 5


def test_snapkv_budget_counts_the_window() -> None:
    assert SnapKVPress(window_size=8).recent == 8
    assert SnapKVPress(window_size=8, recent=12).recent == 12
    with pytest.raises(ValueError, match="max_tokens"):
        SnapKVPress(window_size=64, max_tokens=32)


def test_base_press_is_abstract() -> None:
    with pytest.raises(TypeError):
        BasePress()  # type: ignore[abstract]


def test_select_ratio_zero_returns_arange() -> None:
    scores = torch.randn(2, 3, 9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    idx = KnormPress().select(scores, KnormPress().n_keep(9), valid)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.arange(9).expand(2, 3, 9))


def test_select_keeps_top_scores_sorted() -> None:
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]]])
    idx = select_indices(scores, 3, torch.ones(1, 6, dtype=torch.bool))
    assert idx.tolist() == [[[1, 3, 5]]]


def test_select_forces_sinks_and_recent() -> None:
    scores = torch.tensor([[[-5.0, -5.0, 9.0, 8.0, 7.0, 6.0, -5.0, -5.0]]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    idx = select_indices(scores, 5, valid, n_sink=1, recent=2)
    assert idx.tolist() == [[[0, 2, 3, 6, 7]]]


def test_sinks_are_the_first_real_tokens_of_each_row() -> None:
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    scores = torch.zeros(2, 1, 6)
    scores[:, :, 4] = 1.0
    idx = select_indices(scores, 3, valid, n_sink=2, recent=0)
    assert idx[0].tolist() == [[2, 3, 4]]
    assert idx[1].tolist() == [[0, 1, 4]]
    assert forced_keep_mask(valid, 2, 1).tolist() == [
        [False, False, True, True, False, True],
        [True, True, False, False, False, True],
    ]


def test_padding_never_displaces_real_tokens() -> None:
    valid = torch.tensor([[False, False, False, True, True, True, True, True]])
    scores = torch.tensor([[[1e9, float("inf"), float("nan"), -1e30, float("-inf"), float("nan"), 0.0, 1.0]]])
    idx = select_indices(scores, 5, valid)
    assert idx.tolist() == [[[3, 4, 5, 6, 7]]]


def test_short_row_is_filled_with_leading_padding() -> None:
    valid = torch.tensor([[False, False, False, False, True, True], [True] * 6])
    scores = torch.rand(2, 2, 6)
    idx = select_indices(scores, 4, valid)
    kept_real = valid[0][idx[0]]
    assert kept_real.tolist() == [[False, False, True, True]] * 2  # padding first, both real tokens kept
    assert idx.shape == (2, 2, 4)


def test_select_is_per_head() -> None:
    scores = torch.tensor([[[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])
    idx = select_indices(scores, 2, torch.ones(1, 4, dtype=torch.bool))
    assert idx.tolist() == [[[0, 1], [2, 3]]]


def test_select_rejects_bad_arguments() -> None:
    scores = torch.rand(1, 1, 4)
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="n_keep"):
        select_indices(scores, 5, valid)
    with pytest.raises(ValueError, match="valid"):
        select_indices(scores, 2, valid.float())
    with pytest.raises(ValueError, match="scores"):
        select_indices(scores[0], 2, valid)


def test_streaming_keeps_sinks_and_most_recent() -> None:
    press = StreamingLLMPress(compression_ratio=0.5)
    keys = torch.randn(1, 2, 12, 4)
    valid = torch.ones(1, 12, dtype=torch.bool)
    idx = press.keep_indices(ScoringInputs(keys, keys, valid, 1.0))
    assert idx.tolist() == [[[0, 1, 2, 3, 10, 11]] * 2]
