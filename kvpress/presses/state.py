"""What a press observes, per cache layer: the hook interface between a press and the layer that keeps its state.

The cache layer holds one `PressState` (made by `press.new_state()`) and calls its hooks without knowing which press
it serves: observe a stored prefill chunk, observe a decode step's logits, follow the storage (tokens appended, kept,
rows reindexed), hand the observations to `press.score`, and choose decode-time evictions. Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ScoringInputs:
    """What a press scores stored tokens from: keys/values (B, Hkv, T, D) in full precision, valid (B, T) marks the
    stored tokens rows attend to (False: left padding or filler slots), the model's softmax scale, and what the
    press's state observed: `queries` (B, Hq, W, D) the last W prompt queries after RoPE (the last one at stored
    position T-1), `attention_mass` (B, Hkv, T) accumulated attention. A press with other observations fills its own
    subclass from its state."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    sm_scale: float
    queries: torch.Tensor | None = None
    attention_mass: torch.Tensor | None = None


@dataclass
class PrefillChunk:
    """A prefill chunk the layer has just stored: its queries (B, Hq, Q, D) after RoPE, the softmax scale, and the
    stored position of its first token (`offset` = T - Q: the chunk's keys are the last Q stored). `keys()` builds
    the full-precision keys (B, Hkv, T, D) of every stored token and `valid()` the (B, T) attended-token mask, on
    demand (only presses that need them pay for them). `mass`: what attention_with_mass gave, when the layer asked
    for it (wants_prefill_mass) and the chunk was a first one attended in one pass."""

    queries: torch.Tensor
    sm_scale: float
    offset: int
    keys: Callable[[], torch.Tensor]
    valid: Callable[[], torch.Tensor]
    mass: torch.Tensor | None = None  # (B, Hkv, T) the attention's own probability mass, when it computed it


@dataclass
class EvictionSpan:
    """Where decode-time eviction may act: stored tokens [start, stop) of the `stored` ones (the quantized middle, or
    the only segment, so that segments stay rectangular). `valid()` is the (B, T) attended-token mask, or None when
    every stored token is attended."""

    stored: int
    start: int
    stop: int
    valid: Callable[[], torch.Tensor | None]


class PressState:
    """Per-layer observations of a press that needs none (Knorm, StreamingLLM, Random): every hook does nothing.

    Subclasses keep their tensors aligned with the layer's stored tokens (appended / kept / index_batch) and report
    them in tensors() so that cache.stats() counts them."""

    def observe_prefill(self, chunk: PrefillChunk) -> None:
        """A prefill chunk was stored (called after every chunk, before compression)."""

    def wants_prefill_mass(self) -> bool:
        """Whether this state wants each prefill chunk's attention probability mass (PrefillChunk.mass): then the
        attention of a first chunk computes it in the same pass (attention_mass.attention_with_mass)."""
        return False

    def wants_decode_logits(self) -> bool:
        """Whether the decode step must hand over its logits (observe_decode)."""
        return False

    def observe_decode(self, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None) -> None:
        """A decode step's float32 logits (B, Hq, T) in the log2 domain and lse (B, Hq) (natural log) over every
        stored token (columns before kv_start[b] are padding and were not written)."""

    def observe_query(self, query: torch.Tensor) -> None:
        """A decode step's query (B, Hq, 1, D) after RoPE; its token was just stored (the last stored one). Only
        presses that re-score while decoding (`every`) get it: e.g. SnapKV's window then slides over generated
        tokens."""

    def appended(self, n_tokens: int) -> None:
        """n_tokens were stored after the existing ones."""

    def kept(self, idx: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        """Stored tokens [start, stop) (stop None: the end) are now tokens idx (B, Hkv, K) of that span, relative to
        start; the others are unchanged."""

    def index_batch(self, rows: torch.Tensor) -> None:
        """Batch rows were selected / reordered (beams, repeated rows)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (memory accounting)."""
        return []

    def scoring_inputs(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                       sm_scale: float) -> ScoringInputs:
        """The press's inputs to score the stored tokens: the layer's part plus this state's observations."""
        return ScoringInputs(keys, values, valid, sm_scale)

    def compressed(self) -> None:
        """A compression just ran (whether it dropped tokens or not): forget what only served it."""

    def decode_victims(self, span: EvictionSpan) -> torch.Tensor | None:
        """Before a decode token is stored: indices (B, Hkv, E) sorted ascending, relative to span.start, of tokens of
        the span to evict, or None to evict nothing (the default: only bounded presses evict while decoding)."""
        return None

    def take_rows(self, rows: list["PressState"]) -> None:
        """Become the state of a left-padded batch whose rows were observed one by one in batch-1 caches (prefix
        sharing); only states of presses that allow prefix sharing need it."""


class QueryWindow(PressState):
    """The last `window` prompt queries a press scores with (SnapKV: its observation window; TOVA: the last query).

    `keep=True` (presses that re-score while decoding, `every`): the window survives compressions and slides over
    the decode steps' queries too, so every re-scoring is judged by the last `window` queries, the last one at the
    last stored position (SnapKV keeps its window's tokens: recent >= window_size). Costs window x Hq x D per layer,
    counted in stats()."""

    def __init__(self, window: int, keep: bool = False) -> None:
        self.window = window
        self.keep = keep
        self.queries: torch.Tensor | None = None  # (B, Hq, <= window, D)

    def observe_prefill(self, chunk: PrefillChunk) -> None:
        self.observe_query(chunk.queries)

    def observe_query(self, query: torch.Tensor) -> None:
        recent = query if self.queries is None else torch.cat([self.queries, query], dim=2)
        self.queries = recent[:, :, -self.window :]

    def index_batch(self, rows: torch.Tensor) -> None:
        if self.queries is not None:
            self.queries = self.queries.index_select(0, rows.to(self.queries.device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.queries] if self.queries is not None else []

    def scoring_inputs(self, keys, values, valid, sm_scale) -> ScoringInputs:
        return ScoringInputs(keys, values, valid, sm_scale, queries=self.queries)

    def compressed(self) -> None:
        if not self.keep:  # the next compression (compress_every_chunk) is judged by the queries seen after it
            self.queries = None

    def take_rows(self, rows: list[PressState]) -> None:
        """Each row's last queries, right-aligned and left-padded with zeros where a row observed fewer (padding
        queries are ignored by the scoring: they sit at padding positions)."""
        queries = [r.queries for r in rows if isinstance(r, QueryWindow) and r.queries is not None]
        if not queries:
            self.queries = None
            return
        like = queries[0]
        n = max(q.shape[2] for q in queries)
        padded = []
        for row in rows:
            q = row.queries if isinstance(row, QueryWindow) and row.queries is not None else like[:, :, :0]
            padded.append(torch.nn.functional.pad(q, (0, 0, n - q.shape[2], 0)))
        self.queries = torch.cat(padded, dim=0)
