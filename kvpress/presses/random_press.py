"""Random eviction: a baseline that keeps a random subset of tokens, reproducible from a seed."""
from dataclasses import dataclass

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import ScoringInputs
from kvpress.presses.validation import check_keys, check_non_negative_int, check_valid_mask


@dataclass
class RandomPress(BasePress):
    """Random baseline: uniform random scores from a generator seeded with `seed` on every call, so the same shapes
    always give the same choice (on any device: the scores are drawn on the CPU)."""

    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the seed, then the base budget fields."""
        check_non_negative_int(self.seed, "RandomPress.seed")
        super().__post_init__()

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Uniform [0, 1) scores (B, Hkv, T) float32 from a freshly seeded CPU generator."""
        keys, valid = inputs.keys, inputs.valid
        batch, kv_heads, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        scores = torch.rand(batch, kv_heads, n_tokens, generator=generator, dtype=torch.float32)
        return scores.to(keys.device)
