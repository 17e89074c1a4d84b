"""Knorm: keep the tokens whose keys have the smallest L2 norm (low-norm keys tend to draw the most attention)."""
from dataclasses import dataclass

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import ScoringInputs
from kvpress.presses.validation import check_keys, check_valid_mask


@dataclass
class KnormPress(BasePress):
    """Knorm: score = -||k||_2 per token and kv head; needs no queries and no attention, so it is the cheapest press."""

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Negative key L2 norm (B, Hkv, T) float32, computed in float32."""
        keys, valid = inputs.keys, inputs.valid
        batch, _, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        return -torch.linalg.vector_norm(keys.float(), dim=-1)
