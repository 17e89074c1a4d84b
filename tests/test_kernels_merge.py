"""merge_attention_states: merging attention over two disjoint key halves equals attention over all keys;
empty sides (lse -inf) are ignored even when their outputs are garbage."""
import math

import pytest
import torch

from kvpress.kernels.merge import merge_attention_states


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = q @ k.transpose(-1, -2)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def test_merge_of_two_halves_equals_attention_over_the_whole() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, n, 16, generator=gen) for n in (5, 40, 40))
    q = q * 3  # peaked softmax: the halves get very different lse
    out_a, lse_a = _attend(q, k[..., :17, :], v[..., :17, :])
    out_b, lse_b = _attend(q, k[..., 17:, :], v[..., 17:, :])
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    full_out, full_lse = _attend(q, k, v)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_empty_sides_are_ignored() -> None:
    out_a = torch.tensor([[1.0, 2.0], [float("nan"), 5.0], [7.0, 7.0]])
    lse_a = torch.tensor([0.3, -math.inf, -math.inf])
    out_b = torch.tensor([[float("nan"), 0.0], [3.0, 4.0], [9.0, 9.0]])
    lse_b = torch.tensor([-math.inf, 1.5, -math.inf])
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(lse, torch.tensor([0.3, 1.5, -math.inf]))


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="out_a, out_b"):
        merge_attention_states(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3))
