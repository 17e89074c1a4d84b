"""TOVA (Token Omission Via Attention): keep the tokens the last prompt query attends to most."""
from dataclasses import dataclass

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import QueryWindow, ScoringInputs
from kvpress.presses.validation import check_keys, check_queries, check_sm_scale, check_valid_mask


@dataclass
class TOVAPress(BasePress):
    """TOVA: score = softmax attention of the last prompt query (after RoPE, at stored position T-1) over the row's
    attended stored keys, averaged over the query heads of each kv group. Each layer keeps that one query (a
    QueryWindow of 1), so it works with batches, quantization, chunked prefill and prefix sharing like SnapKV."""

    @property
    def query_window(self) -> int:
        """TOVA needs the last prompt query only."""
        return 1

    def new_state(self) -> QueryWindow:
        """Each layer keeps the last prompt query it saw (with `every`: the last decode query too)."""
        return QueryWindow(1, keep=self.every is not None)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Mean over the group's query heads of the last query's attention probabilities (B, Hkv, T) float32;
        padding / filler tokens (valid False) get 0."""
        keys, valid, queries = inputs.keys, inputs.valid, inputs.queries
        if queries is None:
            raise ValueError("TOVAPress.score needs the last prompt query (post-RoPE); got queries=None")
        batch, kv_heads, n_tokens, head_dim = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        group = check_queries(queries, keys)
        check_sm_scale(inputs.sm_scale)
        last = queries[:, :, -1].float().reshape(batch, kv_heads, group, head_dim)  # query head h -> kv head h // G
        logits = torch.matmul(last, keys.float().transpose(-1, -2)).mul_(inputs.sm_scale)  # (B, Hkv, G, T)
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)
