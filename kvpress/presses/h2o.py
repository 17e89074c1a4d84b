"""H2O (heavy hitters): keep the tokens that have received the most attention so far, plus a recent window."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress.kernels import add_score_mass
from kvpress.presses.attention_mass import accumulate_attention_mass, decode_victims
from kvpress.presses.base import BasePress
from kvpress.presses.state import EvictionSpan, PrefillChunk, PressState, ScoringInputs
from kvpress.presses.validation import check_keys, check_per_token_scores, check_valid_mask


class AttentionMass(PressState):
    """H2O's per-layer state: the attention mass (B, Hkv, T) float32 every stored token received from the prompt's
    queries (in query chunks, O(T x chunk) memory) and from every decode step (from the fused decode's logits)."""

    def __init__(self, press: "H2OPress") -> None:
        self.press = press
        self.mass: torch.Tensor | None = None

    def observe_prefill(self, chunk: PrefillChunk) -> None:
        mass = chunk.mass
        if mass is None:
            mass = accumulate_attention_mass(chunk.queries, chunk.keys(), chunk.sm_scale, chunk.valid(), chunk.offset)
        self.mass = mass if self.mass is None else self.mass + mass

    def wants_prefill_mass(self) -> bool:
        return True

    def wants_decode_logits(self) -> bool:
        return self.mass is not None

    def observe_decode(self, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None) -> None:
        add_score_mass(self.mass, scores, lse, kv_start)

    def appended(self, n_tokens: int) -> None:
        if self.mass is not None:
            self.mass = torch.nn.functional.pad(self.mass, (0, n_tokens))

    def kept(self, idx: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        if self.mass is None:
            return
        mass = self.mass
        if start == 0 and stop is None:
            self.mass = torch.gather(mass, 2, idx.to(mass.device))
            return
        span = torch.gather(mass[:, :, start:stop], 2, idx.to(mass.device))
        self.mass = torch.cat([mass[:, :, :start], span, mass[:, :, stop:]], dim=2)

    def index_batch(self, rows: torch.Tensor) -> None:
        if self.mass is not None:
            self.mass = self.mass.index_select(0, rows.to(self.mass.device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.mass] if self.mass is not None else []

    def scoring_inputs(self, keys, values, valid, sm_scale) -> ScoringInputs:
        return ScoringInputs(keys, values, valid, sm_scale, attention_mass=self.mass)

    def decode_victims(self, span: EvictionSpan) -> torch.Tensor | None:
        """With max_tokens (and no `every`): make room for the next token by evicting the lowest-mass tokens of the
        span (never the first n_sink real tokens nor the last `recent`)."""
        press = self.press
        if press.every is not None:  # re-scored every `every` steps by the layer instead (BasePress.every)
            return None
        if press.max_tokens is None or span.stored < press.max_tokens or self.mass is None:
            return None
        n_main = span.stop - span.start
        protected_sink = max(0, press.n_sink - span.start)
        protected_recent = max(0, press.recent - (span.stored - span.stop))
        # a left-padded quantized batch widens the fp sinks by its padding: the bound then exceeds max_tokens by it
        n_evict = min(span.stored - press.max_tokens + 1, n_main - protected_sink - protected_recent)
        if n_evict <= 0:
            return None
        valid = span.valid()
        valid_main = None if valid is None else valid[:, span.start : span.stop]
        mass_main = self.mass[:, :, span.start : span.stop]
        return decode_victims(mass_main, n_evict, protected_sink, protected_recent, valid_main)


@dataclass
class H2OPress(BasePress):
    """H2O: score = attention mass each stored token received (summed softmax probabilities, accumulated per layer by
    AttentionMass). With max_tokens it also bounds the cache during decoding (see decode_victims).
    The last `recent` tokens (default 32) are always kept, as in the paper's recent window."""

    recent: int = 32

    needs_attention_mass: ClassVar[bool] = True

    def new_state(self) -> AttentionMass:
        """Each layer accumulates the attention mass of its stored tokens."""
        return AttentionMass(self)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """The accumulated attention mass (B, Hkv, T) as float32."""
        keys, valid, attention_mass = inputs.keys, inputs.valid, inputs.attention_mass
        if attention_mass is None:
            raise ValueError(
                "H2OPress.score needs attention_mass (B, Hkv, T); the cache must accumulate it during prefill "
                "because H2OPress.needs_attention_mass is True"
            )
        batch, kv_heads, n_tokens, _ = check_keys(keys)
        check_valid_mask(valid, batch, n_tokens)
        check_per_token_scores(attention_mass, "attention_mass", (batch, kv_heads, n_tokens))
        return attention_mass.float()
