"""StreamingLLM: keep a few attention-sink tokens at the start plus the most recent tokens."""
from dataclasses import dataclass

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import ScoringInputs
from kvpress.presses.validation import check_keys, check_valid_mask


@dataclass
class StreamingLLMPress(BasePress):
    """StreamingLLM: the first n_sink (default 4) real tokens plus the most recent tokens, as many as the budget
    allows. Scores are the token positions, so later tokens rank higher; content is ignored."""

    n_sink: int = 4

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Position of each stored token (B, Hkv, T) as float32 (sinks are forced in by select)."""
        keys, valid = inputs.keys, inputs.valid
        batch, kv_heads, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        positions = torch.arange(n_tokens, dtype=torch.float32, device=keys.device)
        return positions.expand(batch, kv_heads, n_tokens).clone()
