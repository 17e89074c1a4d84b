"""KVPressCache: a transformers `Cache` whose layers keep the logical length apart from the tokens they store.

`update()` only hands the new chunk to the registered attention function (kvpress/attention.py), which writes it
into the layer's store and attends over what is stored: there is never a per-step concatenation of the whole cache.
Presses (which tokens to keep), codecs (how tokens are encoded) and stores (where they live) plug into the layer.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .paged.contiguous import ContiguousStore

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class KVPressLayer(CacheLayerMixin):
    """One attention layer's compressed KV: a store, the per-row first attended token, and the logical length.

    Invariants: `logical_length` counts every position the model has seen (it drives positions/RoPE);
    `store.length` counts the tokens actually held (<= logical after eviction or sliding); rows attend to stored
    tokens `[kv_start[b], store.length)` - stored tokens before `kv_start[b]` are left padding.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, press: Any = None, sliding_window: int | None = None) -> None:
        super().__init__()
        self.press = press
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.store = ContiguousStore()
        self.logical_length = 0
        self.kv_start: torch.Tensor | None = None  # (B,) int32; None when no row has padding
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- transformers CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash the new chunk for the attention function; return it tagged with this layer (no copy)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store.length and key_states.shape[0] != self.store.batch_size:
            raise ValueError(
                f"This KVPressCache holds a batch of {self.store.batch_size} sequences but got {key_states.shape[0]}; "
                "use a fresh cache (or kvpress.wrap, which makes one per generate call) for a new batch."
            )
        self.pending = (key_states, value_states)
        key_states._kvpress_layer = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask function only builds the mask of the new chunk (kv_length = query_length, placed at the logical
        # offset): the attention function knows which stored tokens each row may see.
        return query_length, self.logical_length

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.store.clear()
        self.logical_length = 0
        self.kv_start = None
        self.pending = None
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.length:
            rows = torch.arange(self.store.batch_size, device=self.device).repeat_interleave(repeats)
            self.index_batch(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.index_batch(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last tokens (assisted decoding); only possible while nothing was evicted or slid out."""
        if tokens_to_remove > 0:
            tokens_to_remove = self.logical_length - tokens_to_remove
        n = abs(tokens_to_remove)
        if n == 0:
            return
        if self.store.length != self.logical_length:
            raise ValueError("Cannot crop a KVPressLayer after eviction or sliding: the cropped tokens are gone.")
        self.store.drop_back(n)
        self.logical_length -= n
        self._refresh_views()

    # --- storage operations used by kvpress.attention ------------------------------------------------------
    @property
    def stored_length(self) -> int:
        return self.store.length

    def index_batch(self, rows: torch.Tensor) -> None:
        """Select/reorder batch rows of every per-row tensor."""
        if not self.store.length:
            return
        self.store.index_batch(rows)
        if self.kv_start is not None:
            self.kv_start = self.kv_start.index_select(0, rows.to(self.kv_start.device))
        self._refresh_views()

    def append(self, fields: dict[str, torch.Tensor], chunk_valid: torch.Tensor | None) -> None:
        """Store encoded tokens of a new chunk and advance the logical length; track left padding per row."""
        n_past = self.store.length
        n_new = next(iter(fields.values())).shape[2]
        if chunk_valid is not None:
            self._track_padding(chunk_valid, n_past)
        self.store.append(fields)
        self.logical_length += n_new
        self._refresh_views()

    def _track_padding(self, chunk_valid: torch.Tensor, n_past: int) -> None:
        q = chunk_valid.shape[1]
        n_pad = q - chunk_valid.sum(dim=1)
        positions = torch.arange(q, device=chunk_valid.device)
        if not torch.equal(chunk_valid, positions[None, :] >= n_pad[:, None]):
            raise ValueError(
                "KVPressCache supports left padding only (padding tokens before the real ones). "
                "Set tokenizer.padding_side = 'left'."
            )
        start = torch.zeros_like(n_pad, dtype=torch.int32) if self.kv_start is None else self.kv_start
        fully_padded = start == n_past  # rows that have seen nothing but padding so far
        if bool(((~fully_padded) & (n_pad > 0)).any()):
            raise ValueError("Padding tokens after real tokens are not supported; use left padding.")
        new_start = torch.where(fully_padded, start + n_pad.to(torch.int32), start)
        self.kv_start = new_start if bool((new_start > 0).any()) else None

    def keep(self, idx: torch.Tensor, n_pad_kept: torch.Tensor | None = None) -> None:
        """Keep tokens `idx` (B, H, K) sorted ascending; `n_pad_kept` (B,) padding tokens that stay in front."""
        self.store.keep(idx)
        if self.kv_start is not None:
            self.kv_start = n_pad_kept.to(torch.int32) if n_pad_kept is not None else torch.zeros_like(self.kv_start)
            if not bool((self.kv_start > 0).any()):
                self.kv_start = None
        self._refresh_views()

    def slide(self) -> None:
        """Sliding-window layers keep only the last window - 1 tokens between forwards (as transformers does)."""
        excess = self.store.length - (self.sliding_window - 1)
        if excess > 0:
            self.store.drop_front(excess)
            if self.kv_start is not None:
                self.kv_start = (self.kv_start - excess).clamp_(min=0)
                if not bool((self.kv_start > 0).any()):
                    self.kv_start = None
            self._refresh_views()

    def _refresh_views(self) -> None:
        # transformers reads `.keys`/`.values` in a few places (batch size, offloading): expose views, not copies.
        fields = self.store.fields
        self.keys = self.store.view("k") if "k" in fields else None
        self.values = self.store.view("v") if "v" in fields else None

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (store capacity and padding bookkeeping included)."""
        extra = self.kv_start.numel() * self.kv_start.element_size() if self.kv_start is not None else 0
        return self.store.nbytes() + extra


class KVPressCache(Cache):
    """A transformers Cache that compresses: `KVPressCache(model.config, press=..., quant=..., paged=...)`.

    Requires the model to run the "kvpress" attention (kvpress.wrap does it). Sliding-window layers keep their
    window semantics and are never pressed.
    """

    def __init__(self, config, press: Any = None, quant: Any = None, paged: bool = False) -> None:
        from .config import resolve_config

        self.kv_config = resolve_config(press=press, quant=quant, paged=paged)
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if unsupported:
            raise ValueError(
                f"KVPressCache supports attention layers of types {SUPPORTED_LAYER_TYPES}; this model has {unsupported}."
            )
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.num_key_value_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        layers = []
        for layer_type, kwargs in zip(layer_types, layer_kwargs):
            window = kwargs.get("sliding_window") if layer_type != "full_attention" else None
            layers.append(KVPressLayer(press=None if window else self.kv_config.press, sliding_window=window))
        super().__init__(layers=layers)
        self._last_layer: KVPressLayer | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        last = self._last_layer
        if last is not None and last.pending is not None:
            last.pending = None
            raise RuntimeError(
                "KVPressCache needs the model to use the 'kvpress' attention: call `kvpress.wrap(model)` (or "
                "`model.set_attn_implementation('kvpress')` after `import kvpress`) before generating with it."
            )
        self._last_layer = self.layers[layer_idx]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """Memory accounting from the tensors actually held, beside what a 16-bit DynamicCache would hold."""
        layers = [layer for layer in self.layers if isinstance(layer, KVPressLayer)]
        batch = max((layer.store.batch_size for layer in layers), default=0)
        nbytes = sum(layer.nbytes() for layer in layers)
        per_token_head_fp16 = 2 * self.head_dim * 2  # K and V, 2 bytes each
        dynamic_tokens = [
            min(layer.logical_length, layer.sliding_window - 1) if layer.is_sliding else layer.logical_length
            for layer in layers
        ]
        fp16_nbytes = sum(batch * self.num_key_value_heads * t * per_token_head_fp16 for t in dynamic_tokens)
        full = [layer for layer in layers if not layer.is_sliding] or layers
        return {
            "logical_tokens": max((layer.logical_length for layer in layers), default=0),
            "stored_tokens": sum(layer.stored_length for layer in full) / max(len(full), 1),
            "stored_tokens_per_layer": [layer.stored_length for layer in layers],
            "batch_size": batch,
            "nbytes": nbytes,
            "fp16_nbytes": fp16_nbytes,
            "compression": nbytes / fp16_nbytes if fp16_nbytes else 1.0,
            "press": repr(self.kv_config.press) if self.kv_config.press is not None else None,
            "quant": repr(self.kv_config.quant) if self.kv_config.quant is not None else None,
        }

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for tests and memory audits)."""
        out = []
        for layer in self.layers:
            out.extend(layer.store.tensors())
            if layer.kv_start is not None:
                out.append(layer.kv_start)
        return out
