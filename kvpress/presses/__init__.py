"""Eviction presses: score stored tokens and pick which to keep; each press makes the per-layer state of what it
observes (presses/state.py). Pure torch: no cache, attention function or transformers."""
from kvpress.presses.attention_mass import accumulate_attention_mass, decode_victims, window_attention_mass
from kvpress.presses.base import BasePress, forced_keep_mask, select_indices
from kvpress.presses.expected import ExpectedAttentionPress
from kvpress.presses.h2o import H2OPress
from kvpress.presses.knorm import KnormPress
from kvpress.presses.kvzip import KVzipPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.registry import PRESSES, SPEC_FORMAT, parse_press
from kvpress.presses.snapkv import SnapKVPress
from kvpress.presses.state import EvictionSpan, PrefillChunk, PressState, QueryWindow, ScoringInputs
from kvpress.presses.streaming import StreamingLLMPress
from kvpress.presses.tova import TOVAPress

__all__ = [
    "BasePress",
    "EvictionSpan",
    "ExpectedAttentionPress",
    "H2OPress",
    "KnormPress",
    "KVzipPress",
    "PRESSES",
    "PrefillChunk",
    "PressState",
    "QueryWindow",
    "RandomPress",
    "SPEC_FORMAT",
    "ScoringInputs",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "accumulate_attention_mass",
    "decode_victims",
    "forced_keep_mask",
    "parse_press",
    "select_indices",
    "window_attention_mass",
]
