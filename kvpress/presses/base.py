"""Base class of the eviction presses: budget arithmetic (n_keep), the shared top-k selection (select_indices) and
the hooks a cache calls (new_state, prepare_compression, check_prefix_sharing, check_fp_slots).

A press only decides *which* stored tokens to keep; the cache gathers them. Presses are pure torch and know nothing
about the attention function or transformers; what they observe lives in their PressState (kvpress/presses/state.py).
"""
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvpress.presses.head_budgets import BUDGET_MODES, keep_per_head, rank_scores
from kvpress.presses.layer_budgets import LAYER_SCHEDULES, pyramid_shares
from kvpress.presses.state import PressState, ScoringInputs
from kvpress.presses.validation import check_non_negative_int, check_per_token_scores, check_valid_mask

# Slack for floating-point error in (1 - ratio) * n: e.g. (1 - 0.7) * 10 == 3.0000000000000004 must keep 3, not 4.
_ROUNDING_SLACK = 1e-9


def forced_keep_mask(valid: torch.Tensor, n_sink: int, recent: int) -> torch.Tensor:
    """(B, T) bool mask of tokens a press must never drop: the first `n_sink` real tokens of each row and its last
    `recent` real tokens. Padding (valid == False) is never forced."""
    n_tokens = valid.shape[-1]
    real_rank = torch.cumsum(valid.to(torch.int64), dim=-1) - 1  # 0 for the first real token of the row
    is_sink = valid & (real_rank < n_sink)
    positions = torch.arange(n_tokens, device=valid.device)
    is_recent = valid & (positions >= n_tokens - recent)
    return is_sink | is_recent


def select_indices(
    scores: torch.Tensor, n_keep: int, valid: torch.Tensor, n_sink: int = 0, recent: int = 0
) -> torch.Tensor:
    """Indices (B, Hkv, n_keep) int64, sorted ascending, of the n_keep highest-scoring tokens of every head.

    Sinks and recent tokens (see forced_keep_mask) rank above every real token, padding below every real token, so
    padding is kept only when a row has fewer than n_keep real tokens (it sits at the start of the row, so it comes
    first in the sorted indices and the caller keeps it masked). NaN or infinite press scores are clamped to the
    finite range so that they cannot cross these tiers. If n_keep is smaller than the number of forced tokens, an
    arbitrary subset of them is kept.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, Hkv, T); got {tuple(scores.shape)}")
    batch, _, n_tokens = scores.shape
    check_valid_mask(valid, batch, n_tokens)
    check_non_negative_int(n_sink, "n_sink")
    check_non_negative_int(recent, "recent")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= n_tokens:
        raise ValueError(f"n_keep must be an integer in [0, T={n_tokens}]; got {n_keep!r}")

    ranked = rank_scores(scores, valid, forced_keep_mask(valid, n_sink, recent))
    kept = torch.topk(ranked, n_keep, dim=-1, sorted=False).indices
    return torch.sort(kept, dim=-1).values.to(torch.int64)


@dataclass
class BasePress(ABC):
    """Common budget fields of every eviction press; subclasses implement score() (higher = more important).

    compression_ratio is the fraction of stored tokens REMOVED at prefill (0.0 keeps all); max_tokens optionally caps
    the tokens kept per head; the first n_sink real tokens and the last `recent` tokens are always kept.
    `layers`: "uniform" (every layer keeps n_keep) or "pyramid" (the same total over the pressed layers, shared out
    linearly decreasing with depth as in PyramidKV; see layer_budget). `every`: with max_tokens, also bound the cache
    while decoding: a layer re-scores its stored tokens with this press's score and keeps its budget again as soon as
    it holds `every` tokens more than the budget, so it never holds more than max_tokens + every tokens.
    `budget`: "uniform" (every kv head keeps the layer's budget), "adaptive" (the layer's total shared over its heads
    by score, AdaKV) or "global" (one total over every pressed layer and head, KVzip's allocation); see
    presses/head_budgets.py. Per-head budgets store each head at its own length (the bytes really shrink) and compress
    the prompt once: later chunks are stored as they come.
    """

    compression_ratio: float = 0.0
    max_tokens: int | None = None
    n_sink: int = 0
    recent: int = 0
    layers: str = "uniform"
    every: int | None = None
    budget: str = "uniform"

    needs_attention_mass: ClassVar[bool] = False
    """True when score() needs the accumulated attention mass (the cache must then compute it during prefill)."""

    rescores_while_decoding: ClassVar[bool] = True
    """False when score() cannot be recomputed by a layer during decoding (e.g. it needs the model): `every` is
    then refused at construction."""

    def __post_init__(self) -> None:
        """Validate the budget fields so that a bad configuration fails at construction time."""
        name = type(self).__name__
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(
                f"{name}: compression_ratio is the fraction of tokens removed and must be in [0, 1); got {ratio!r}"
            )
        self.compression_ratio = float(ratio)
        check_non_negative_int(self.n_sink, f"{name}.n_sink")
        check_non_negative_int(self.recent, f"{name}.recent")
        if self.max_tokens is not None:
            floor = self.n_sink + self.recent + 1
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < floor:
                raise ValueError(
                    f"{name}: max_tokens must be an integer >= n_sink + recent + 1 = {floor} "
                    f"(n_sink={self.n_sink}, recent={self.recent}); got {self.max_tokens!r}. "
                    f"Raise max_tokens or lower n_sink/recent."
                )
        self._check_layer_options(name)

    def _check_layer_options(self, name: str) -> None:
        """Validate `layers` and `every` (every needs max_tokens and a score a layer can recompute while decoding)."""
        if self.layers not in LAYER_SCHEDULES:
            raise ValueError(f"{name}: layers must be one of {LAYER_SCHEDULES}; got {self.layers!r}")
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
                raise ValueError(f"{name}: every (decode steps between re-scorings) must be a positive integer; "
                                 f"got {self.every!r}")
            if self.max_tokens is None:
                raise ValueError(f"{name}: every={self.every} bounds the cache while decoding at max_tokens; set "
                                 "max_tokens too (e.g. 'snapkv:0.5:max_tokens=2048,every=64').")
            if not self.rescores_while_decoding:
                raise ValueError(f"{name} cannot re-score while decoding (its score needs the model, not only the "
                                 f"layer's stored tokens), so every={self.every} is not supported; use max_tokens "
                                 "alone (prompt compression only) or another press.")
        self._check_budget(name)

    def _check_budget(self, name: str) -> None:
        """Validate `budget`: per-head budgets compress once, so no decode-time bound (every, H2O's max_tokens), and
        `global` already shares one total over the layers (no `layers=pyramid` on top)."""
        if self.budget not in BUDGET_MODES:
            raise ValueError(f"{name}: budget must be one of {BUDGET_MODES}; got {self.budget!r}")
        if self.budget == "uniform":
            return
        if self.every is not None or (self.needs_attention_mass and self.max_tokens is not None):
            raise ValueError(f"{name}: budget={self.budget} stores each head at its own length and compresses the "
                             "prompt once; it cannot also bound the cache while decoding (every / max_tokens with "
                             "decode-time eviction). Use budget=uniform for that.")
        if self.budget == "global" and self.layers != "uniform":
            raise ValueError(f"{name}: budget=global shares one total over every layer and head by score; "
                             f"layers={self.layers} would split it twice. Use one of them (budget=uniform with "
                             f"layers={self.layers}).")

    @property
    def per_head_budgets(self) -> bool:
        """Whether heads keep different numbers of tokens (budget adaptive or global)."""
        return self.budget != "uniform"

    def keep_masks(self, ranked: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
        """Per-head selection: keep masks (B, Hkv, T) bool for rankings (B, Hkv, T) of one layer (adaptive) or of
        every pressed layer (global), each row keeping budgets[b] x heads tokens in all (head_budgets.py)."""
        return keep_per_head(ranked, budgets)

    def rank(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, T) float32 ranking of scores: padding -inf, this press's forced sinks / recent tokens +inf."""
        return rank_scores(scores, valid, forced_keep_mask(valid, self.n_sink, self.recent))

    @property
    def query_window(self) -> int:
        """How many trailing prompt queries score() needs (0: it needs none and may be passed queries=None)."""
        return 0

    def n_keep(self, n_tokens: int) -> int:
        """Tokens kept per head after prefill of n_tokens stored tokens: ceil((1 - compression_ratio) * n_tokens).

        Rounding up means ratio 0 keeps everything and any ratio keeps at least one token of a non-empty prompt. The
        result is then capped by max_tokens and never goes below min(n_tokens, n_sink + recent).
        """
        check_non_negative_int(n_tokens, "n_tokens")
        keep = math.ceil((1.0 - self.compression_ratio) * n_tokens - _ROUNDING_SLACK)
        keep = min(max(keep, 0), n_tokens)
        if self.max_tokens is not None:
            keep = min(keep, self.max_tokens)
        return max(keep, min(n_tokens, self.n_sink + self.recent))

    def layer_budget(self, n_tokens: int, layer_idx: int, n_layers: int) -> int:
        """Tokens layer `layer_idx` of `n_layers` pressed layers keeps of n_tokens: n_keep(n_tokens) when uniform.
        Pyramid: the layers' total n_layers * n_keep(n_tokens) (max_tokens then caps the mean per layer, not each
        layer) minus the forced sinks + recent of every layer is shared out linearly decreasing with depth
        (layer_budgets.pyramid_shares); each layer keeps sinks + recent + its share, at most n_tokens."""
        keep = self.n_keep(n_tokens)
        if self.layers == "uniform" or n_layers <= 1:
            return keep
        if not 0 <= layer_idx < n_layers:
            raise ValueError(f"layer_idx must be in [0, {n_layers}); got {layer_idx!r}")
        forced = min(n_tokens, self.n_sink + self.recent)
        shares = pyramid_shares((keep - forced) * n_layers, n_layers, n_tokens - forced)
        return forced + shares[layer_idx]

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Importance (B, Hkv, T) float32 of each stored token, higher = keep; GQA heads aggregated per kv group.

        See ScoringInputs: keys/values (B, Hkv, T, D), valid (B, T), sm_scale, and what this press's state observed
        (queries, attention_mass)."""

    def select(self, scores: torch.Tensor, n_keep: int, valid: torch.Tensor) -> torch.Tensor:
        """Indices (B, Hkv, n_keep) int64 sorted ascending of the tokens to keep; see select_indices."""
        return select_indices(scores, n_keep, valid, self.n_sink, self.recent)

    def keep_indices(self, inputs: ScoringInputs) -> torch.Tensor:
        """Convenience: score, then select n_keep(T) tokens per head. Returns (B, Hkv, n_keep) int64."""
        scores = self.score(inputs)
        check_per_token_scores(scores, f"{type(self).__name__}.score output", tuple(inputs.keys.shape[:3]))
        return self.select(scores, self.n_keep(inputs.keys.shape[2]), inputs.valid)

    # --- hooks of the cache -------------------------------------------------------------------------------------
    def new_state(self) -> PressState:
        """A fresh per-layer state: what this press observes during prefill and decode (nothing by default)."""
        return PressState()

    def prepare_compression(self, cache: Any, model: Any) -> None:
        """Called once per cache when its prompt is complete, before its layers compress: by
        `KVPressCache.compress(model)`, i.e. at the first decode step of a generate call (wrap hands its model to the
        cache; a cache passed to a wrapped model's generate gets it too), by the kv-press pipeline, or by the user.
        A press that scores by running the model itself (KVzip replays the context through `model` on `cache`) does
        it here and leaves the result in each layer's state (`layer.press_state`); `model` is None when nobody
        handed one. Default: nothing (each layer scores from its own observations)."""

    def check_prefix_sharing(self) -> None:
        """Raise ValueError if this press cannot be used with a PrefixCache: a shared prefix's queries are never
        recomputed, so a press may only observe the last `query_window` prompt queries (never matched)."""
        if self.per_head_budgets:
            raise ValueError(f"prefix_cache cannot be combined with budget={self.budget}: per-head budgets store "
                             "each head at its own length, and shared prefix pages hold every head's tokens. Use "
                             "budget=uniform, or no prefix_cache.")
        if self.needs_attention_mass or self.max_tokens is not None:
            raise ValueError(
                f"prefix_cache cannot be combined with {type(self).__name__}(needs_attention_mass="
                f"{self.needs_attention_mass}, max_tokens={self.max_tokens}): it scores with the attention of every "
                "prompt query, and a shared prefix's queries are not recomputed. Use snapkv, tova, streaming, knorm "
                "or random, or no prefix_cache."
            )

    def check_fp_slots(self, n_fp: int, described: str) -> None:
        """Decode-time eviction only touches quantized tokens: a bound (max_tokens) must leave room for quantized
        tokens next to the `n_fp` full-precision slots of a quantized layer (`described` names them)."""
        if self.max_tokens is not None and self.max_tokens <= n_fp:
            raise ValueError(
                f"max_tokens={self.max_tokens} leaves no room for quantized tokens next to {described}; raise "
                f"max_tokens above {n_fp} or lower quant residual."
            )
