"""Expected Attention (NVIDIA kvpress, 2025): score each stored token by the attention that *future* queries are
expected to give it, from the mean and covariance of recent prompt queries moved to future positions. Query-agnostic
and cheap (no extra forward)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import PressState, PrefillChunk, ScoringInputs
from kvpress.presses.validation import check_keys, check_valid_mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE pairing: (x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries (B, H, W, D) from post-RoPE ones, with cos/sin (B, W, R) of their positions (R <= D rotary
    dims first; a RoPE scaling factor, cos^2 + sin^2 != 1, is divided out)."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].float(), sin[:, None].float()
    rot = queries[..., :r].float()
    pre = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return torch.cat([pre, queries[..., r:].float()], dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, D, D) matrix M with M q = mean over future positions of RoPE(q), from their cos/sin (B, P, R)."""
    batch, _, r = cos.shape
    c, s = cos.float().mean(dim=1), sin.float().mean(dim=1)  # (B, R)
    half = r // 2
    rot = torch.zeros(batch, head_dim, head_dim, dtype=torch.float32, device=cos.device)
    idx = torch.arange(r, device=cos.device)
    rot[:, idx, idx] = c
    lo = torch.arange(half, device=cos.device)
    rot[:, lo, lo + half] = -s[:, :half]  # rotate_half: out[i] = -x[i + half] for i < half
    rot[:, lo + half, lo] = s[:, half:]  # out[i + half] = x[i]
    rest = torch.arange(r, head_dim, device=cos.device)
    rot[:, rest, rest] = 1.0
    return rot


class QueryStatistics(PressState):
    """The last `window` prompt queries (post-RoPE), their positions and validity, and the future-query mean and
    covariance computed from them when the cache prepares the compression.

    `keep=True` (re-scoring while decoding, `every`): the window survives compressions and takes the decode steps'
    queries too; each re-scoring recomputes the statistics with the RoPE the cache last handed over (prepare)."""

    def __init__(self, window: int, keep: bool = False) -> None:
        self.window = window
        self.keep = keep
        self.rotary: Any = None  # the model's RoPE from the last prepare (re-used by decode-time re-scoring)
        self.n_future = 0
        self.queries: torch.Tensor | None = None  # (B, Hq, <= window, D)
        self.positions: torch.Tensor | None = None  # (B, <= window) int64 positions of those queries
        self.real: torch.Tensor | None = None  # (B, <= window) bool: not padding
        self.seen = 0  # positions stored so far (prompt tokens, padding included)
        self.n_pad: torch.Tensor | None = None  # (B,) padding tokens so far
        self.mean: torch.Tensor | None = None  # (B, Hq, D) future query mean
        self.cov: torch.Tensor | None = None  # (B, Hq, D, D) future query covariance

    def appended(self, n_tokens: int) -> None:
        self.seen += n_tokens

    def observe_prefill(self, chunk: PrefillChunk) -> None:
        n_q = chunk.queries.shape[2]
        real = chunk.valid()[:, chunk.offset:chunk.offset + n_q]
        pads = (~real).sum(dim=1)
        self.n_pad = pads if self.n_pad is None else self.n_pad + pads
        positions = torch.arange(self.seen - n_q, self.seen, device=real.device)[None] - self.n_pad[:, None]
        self._push(chunk.queries, positions.clamp_min(0), real)

    def observe_query(self, query: torch.Tensor) -> None:
        if self.queries is None or self.n_pad is None:
            return
        positions = (self.seen - 1 - self.n_pad)[:, None].to(self.positions.dtype)
        self._push(query, positions, torch.ones_like(positions, dtype=torch.bool))

    def _push(self, queries: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> None:
        """Append queries (B, Hq, Q, D) with their positions and validity (B, Q); keep the last `window`."""
        cat = (lambda old, new: new if old is None else torch.cat([old, new], dim=-2 if new.dim() == 4 else -1))
        self.queries = cat(self.queries, queries)[:, :, -self.window:]
        self.positions = cat(self.positions, positions)[:, -self.window:]
        self.real = cat(self.real, real)[:, -self.window:]

    def index_batch(self, rows: torch.Tensor) -> None:
        for name in ("queries", "positions", "real", "n_pad", "mean", "cov"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows.to(value.device)))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.queries, self.positions, self.real, self.n_pad, self.mean, self.cov) if t is not None]

    def prepare(self, rotary: Any, n_future: int) -> None:
        """Future-query mean and covariance: un-rotate the window's queries with `rotary(x, position_ids) -> (cos,
        sin)` (the model's RoPE), take their mean/covariance, and apply the mean RoPE rotation of the next n_future
        positions. rotary None: statistics of the post-RoPE queries as they are (no position shift)."""
        self.rotary, self.n_future = rotary, n_future
        if self.queries is None:
            return
        queries = self.queries.float()
        batch, _, _, head_dim = queries.shape
        rot = None
        if rotary is not None:
            cos, sin = rotary(queries, self.positions)
            queries = unrotate(queries, cos, sin)
            last = self.positions.masked_fill(~self.real, -1).amax(dim=1)  # (B,) last real position
            future = last[:, None] + torch.arange(1, n_future + 1, device=last.device)[None]
            rot = mean_rotation(*rotary(queries, future), head_dim)
        weight = self.real[:, None, :, None].float()  # (B, 1, W, 1)
        count = weight.sum(dim=2).clamp_min(1.0)
        mean = (queries * weight).sum(dim=2) / count  # (B, Hq, D)
        centred = (queries - mean[:, :, None]) * weight
        cov = centred.transpose(-1, -2) @ centred / count[..., None]  # (B, Hq, D, D)
        if rot is not None:
            mean = torch.einsum("bij,bhj->bhi", rot, mean)
            cov = rot[:, None] @ cov @ rot[:, None].transpose(-1, -2)
        self.mean, self.cov = mean, cov

    def scoring_inputs(self, keys, values, valid, sm_scale) -> ScoringInputs:
        if self.mean is None:  # not prepared since the last compression: compress_every_chunk (no RoPE, no position
            self.prepare(self.rotary, self.n_future)  # shift) or a decode-time re-scoring (the RoPE of the last prepare)
        return ExpectedInputs(keys, values, valid, sm_scale, mean=self.mean, cov=self.cov)

    def compressed(self) -> None:
        self.mean = self.cov = None
        if not self.keep:
            self.queries = self.positions = self.real = None


@dataclass
class ExpectedInputs(ScoringInputs):
    """ScoringInputs plus the future queries' mean (B, Hq, D) and covariance (B, Hq, D, D)."""

    mean: torch.Tensor | None = None
    cov: torch.Tensor | None = None


def model_rotary(model: Any):
    """`(x, position_ids) -> (cos, sin)` of the model's global RoPE, or None when it has none to find."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return None
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma3: one RoPE per layer type
        return lambda x, pos: rotary(x, pos, "full_attention")
    return rotary


@dataclass
class ExpectedAttentionPress(BasePress):
    """score = softmax over stored tokens of exp(s mu.k + s^2 k^T Sigma k / 2) (the expected softmax numerator of a
    Gaussian future query q ~ N(mu, Sigma), s = the softmax scale), averaged over the kv group's query heads, times
    the value norm. mu, Sigma: the last `window` prompt queries un-rotated with the model's RoPE, then rotated by the
    mean RoPE of the next `n_future` positions (the model reaches the press through prepare_compression; without it
    the post-RoPE statistics are used as they are). The first n_sink (default 4) tokens are always kept."""

    n_sink: int = 4
    window: int = 64
    n_future: int = 512

    def __post_init__(self) -> None:
        for name in ("window", "n_future"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExpectedAttentionPress.{name} must be a positive integer; got {value!r}")
        super().__post_init__()

    def new_state(self) -> QueryStatistics:
        """Each layer keeps its last `window` prompt queries and their positions."""
        return QueryStatistics(self.window, keep=self.every is not None)

    def prepare_compression(self, cache: Any, model: Any) -> None:
        """Turn every layer's window into future-query statistics with the model's RoPE."""
        rotary = model_rotary(model) if model is not None else None
        for layer in cache.layers:
            state = getattr(layer, "press_state", None)
            if getattr(layer, "press", None) is self and isinstance(state, QueryStatistics):
                with torch.inference_mode():
                    state.prepare(rotary, self.n_future)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """(B, Hkv, T) float32 expected attention times value norm; padding gets 0."""
        if not isinstance(inputs, ExpectedInputs) or inputs.mean is None:
            raise ValueError("ExpectedAttentionPress.score needs the future-query statistics (ExpectedInputs)")
        keys, valid = inputs.keys.float(), inputs.valid
        batch, kv_heads, n_tokens, head_dim = check_keys(inputs.keys)
        check_valid_mask(valid, batch, n_tokens)
        group = inputs.mean.shape[1] // kv_heads
        s = inputs.sm_scale
        mean = inputs.mean.reshape(batch, kv_heads, group, head_dim)
        cov = inputs.cov.reshape(batch, kv_heads, group, head_dim, head_dim)
        linear = torch.einsum("bhgd,bhtd->bhgt", mean, keys) * s
        quad = ((keys[:, :, None] @ cov) * keys[:, :, None]).sum(dim=-1) * (s * s / 2)  # (B, Hkv, G, T)
        logits = (linear + quad).masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)
        return probs * inputs.values.float().norm(dim=-1)
