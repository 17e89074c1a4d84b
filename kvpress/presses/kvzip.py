"""KVzip (Kim et al., NeurIPS 2025): keep the context tokens the model attends to most while it reconstructs the
context. Query-agnostic: a context compressed once serves any later question."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvpress.presses.base import BasePress
from kvpress.presses.state import PressState, ScoringInputs


class KVzipState(PressState):
    """A layer's KVzip scores (B, Hkv, T), aligned with its stored tokens: set by the replay, followed through
    evictions, and tokens stored after scoring (a question prefilled on a compressed context) get +inf (kept)."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None

    def scored(self, scores: torch.Tensor) -> None:
        """The replay's scores (B, Hkv, T) of the stored tokens."""
        self.scores = scores

    def appended(self, n_tokens: int) -> None:
        if self.scores is not None:
            pad = self.scores.new_full((*self.scores.shape[:2], n_tokens), float("inf"))
            self.scores = torch.cat([self.scores, pad], dim=2)

    def kept(self, idx: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        if self.scores is None:
            return
        stop = self.scores.shape[2] if stop is None else stop
        span = self.scores[:, :, start:stop].gather(2, idx.to(self.scores.device))
        self.scores = torch.cat([self.scores[:, :, :start], span, self.scores[:, :, stop:]], dim=2)

    def index_batch(self, rows: torch.Tensor) -> None:
        if self.scores is not None:
            self.scores = self.scores.index_select(0, rows.to(self.scores.device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.scores] if self.scores is not None else []

    def scoring_inputs(self, keys, values, valid, sm_scale) -> ScoringInputs:
        return ScoringInputs(keys, values, valid, sm_scale, attention_mass=self.scores)


@dataclass
class KVzipPress(BasePress):
    """KVzip: score = max attention probability a context token receives, over the replay's queries and the query
    heads of its kv group, while the model reads `prompt_ids` followed by the context again (on top of the stored
    context KV, in chunks of `chunk_size`). The replay runs in `prepare_compression(cache, model)`; it needs the
    model (wrap's generate, the kv-press pipeline or `cache.compress(model=...)` hand it over) and the context ids
    (`cache.prompt_ids`, recorded by the same callers). `prompt_ids` default () is tokenizer-free: the context is
    simply repeated (the model's copying heads then attend to the token after each earlier occurrence); pass the
    ids of e.g. "Repeat the previous context exactly." to follow the paper. Left-padded batches work (each row
    replays its own tokens); chunked compression (compress_every_chunk) and prefix sharing are refused.
    `budget` defaults to "global", KVzip's own allocation (one total over every layer and head, each head stored at
    its own length): measured against "uniform" on the project's needle tasks (query-agnostic, 2k tokens, n=20,
    eval/results/presses_issue15_agnostic.md) it kept 100% of the full cache's accuracy at 0.5 and 0.75 removed where
    uniform kept 85% and 15%; `budget=uniform` remains for comparison."""

    chunk_size: int = 512
    prompt_ids: tuple[int, ...] = ()
    budget: str = "global"

    rescores_while_decoding: ClassVar[bool] = False  # the replay needs the model and the context's token ids

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"KVzipPress.chunk_size must be a positive integer; got {self.chunk_size!r}")
        self.prompt_ids = tuple(int(i) for i in self.prompt_ids)
        super().__post_init__()

    def new_state(self) -> KVzipState:
        """Each layer keeps the scores the replay gave its stored tokens."""
        return KVzipState()

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """The replay's scores (B, Hkv, T) float32 (padding gets whatever; selection masks it)."""
        if inputs.attention_mass is None:
            raise ValueError(
                "KVzipPress scores by replaying the context through the model at cache level: call "
                "cache.compress(model=...) (wrap's generate and the kv-press pipeline do); it cannot compress "
                "layer by layer (compress_every_chunk)."
            )
        return inputs.attention_mass.float()

    def check_prefix_sharing(self) -> None:
        """A shared prefix's keys are not the layer's own stored tokens: the replay needs them all."""
        raise ValueError("prefix_cache cannot be combined with KVzipPress: the context replay needs every stored "
                         "token of the prompt in the layer; use no prefix_cache.")

    def prepare_compression(self, cache: Any, model: Any) -> None:
        """Replay the context through `model` and leave each layer's scores in its state (layers that already hold
        scores, e.g. a compressed context with a question appended, keep theirs)."""
        from kvpress.presses.replay import replay_scores

        pressed = {i: layer for i, layer in enumerate(cache.layers)
                   if getattr(layer, "press", None) is self and layer.needs_compression
                   and isinstance(layer.press_state, KVzipState) and layer.press_state.scores is None}
        if not pressed:
            return
        if model is None:
            raise ValueError("KVzipPress needs the model to replay the context: use cache.compress(model=...) or "
                             "generate through kvpress.wrap.")
        first = next(iter(pressed.values()))
        ids = getattr(cache, "prompt_ids", None)
        if ids is None or ids.shape[-1] != first.logical_length or first.stored_length != first.logical_length:
            raise ValueError(
                f"KVzipPress needs the token ids of every stored position (cache.record_prompt_ids): the layers hold "
                f"{first.stored_length} of {first.logical_length} positions, recorded ids: "
                f"{None if ids is None else tuple(ids.shape)}."
            )
        contexts = {i: layer.stored_kv() for i, layer in enumerate(cache.layers) if layer.is_initialized}
        n_pad = first.n_pad.tolist() if first.n_pad is not None else [0] * ids.shape[0]
        scores = replay_scores(model, contexts, set(pressed), ids.to(first.device), n_pad, self.prompt_ids,
                               self.chunk_size)
        for index, layer in pressed.items():
            layer.press_state.scored(scores[index])
