"""SnapKV: keep the tokens that the last prompt queries (the observation window) attend to most."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpress.presses.attention_mass import window_attention_mass
from kvpress.presses.base import BasePress
from kvpress.presses.state import QueryWindow, ScoringInputs
from kvpress.presses.validation import check_keys, check_valid_mask


def masked_avg_pool(scores: torch.Tensor, valid: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average (B, H, T) scores over a centred window of kernel_size (odd) tokens, counting only real tokens, so
    that padding (and the row edges) do not drag the scores of their neighbours down. Output keeps shape (B, H, T)."""
    if kernel_size == 1:
        return scores
    batch, heads, n_tokens = scores.shape
    real = valid[:, None, :].to(scores.dtype).expand(batch, heads, n_tokens)
    pool = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    summed = F.avg_pool1d((scores * real).reshape(batch * heads, 1, n_tokens), **pool)
    counted = F.avg_pool1d(real.reshape(batch * heads, 1, n_tokens), **pool)
    pooled = torch.where(counted > 0, summed / counted.clamp_min(1e-12), torch.zeros_like(summed))
    return pooled.reshape(batch, heads, n_tokens)


@dataclass
class SnapKVPress(BasePress):
    """SnapKV: score = attention of the last window_size prompt queries to each key (softmax over all keys, causal
    inside the window), averaged over window queries and the kv group's query heads, then average-pooled along T
    with kernel_size so that neighbours of important tokens survive too (avg keeps a smooth, mass-proportional score;
    max would let one spike protect a whole kernel).

    The window tokens are always kept: recent is raised to at least window_size. A prompt shorter than the window uses
    all of its queries as the window (and is then kept whole).
    """

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        """Validate window/kernel sizes and raise recent to window_size before the base budget checks."""
        for name in ("window_size", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SnapKVPress.{name} must be a positive integer; got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"SnapKVPress.kernel_size must be odd so the pooling window is centred; got {self.kernel_size}"
            )
        if isinstance(self.recent, int) and not isinstance(self.recent, bool):
            self.recent = max(self.recent, self.window_size)
        super().__post_init__()

    @property
    def query_window(self) -> int:
        """SnapKV needs the last window_size prompt queries (fewer if the prompt is shorter)."""
        return self.window_size

    def new_state(self) -> QueryWindow:
        """Each layer keeps the last window_size prompt queries it saw (and, with `every`, the decode queries)."""
        return QueryWindow(self.window_size, keep=self.every is not None)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Pooled mean window attention (B, Hkv, T) float32; queries (B, Hq, W, D) must be the last W prompt queries
        (only the last window_size of them are used)."""
        keys, valid, queries, sm_scale = inputs.keys, inputs.valid, inputs.queries, inputs.sm_scale
        if queries is None:
            raise ValueError(
                "SnapKVPress.score needs the last window_size prompt queries (post-RoPE); got queries=None"
            )
        batch, _, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        window = queries[:, :, -self.window_size:] if queries.dim() == 4 else queries
        mass = window_attention_mass(window, keys, sm_scale, valid)
        group_size = queries.shape[1] // keys.shape[1]
        window_positions = torch.arange(n_tokens - window.shape[2], n_tokens, device=keys.device)
        real_queries = valid[:, window_positions].sum(dim=-1).clamp_min(1)  # (B,)
        mean_attention = mass / (real_queries[:, None, None] * group_size)
        return masked_avg_pool(mean_attention, valid, self.kernel_size)
