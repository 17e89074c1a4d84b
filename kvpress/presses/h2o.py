"""H2O (heavy hitters): keep the tokens that have received the most attention so far, plus a recent window."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.validation import check_keys, check_per_token_scores, check_valid_mask


@dataclass
class H2OPress(BasePress):
    """H2O: score = attention mass each stored token received (summed softmax probabilities, accumulated by the cache
    with accumulate_attention_mass). With max_tokens it also bounds the cache during decoding (see decode_victims).
    The last `recent` tokens (default 32) are always kept, as in the paper's recent window."""

    recent: int = 32

    needs_attention_mass: ClassVar[bool] = True

    def score(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        attention_mass: torch.Tensor | None,
        sm_scale: float,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """The accumulated attention mass (B, Hkv, T) as float32."""
        if attention_mass is None:
            raise ValueError(
                "H2OPress.score needs attention_mass (B, Hkv, T); the cache must accumulate it during prefill "
                "because H2OPress.needs_attention_mass is True"
            )
        batch, kv_heads, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        check_per_token_scores(attention_mass, "attention_mass", (batch, kv_heads, n_tokens))
        return attention_mass.float()
