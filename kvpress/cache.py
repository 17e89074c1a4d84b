"""KVPressCache: a transformers `Cache` whose layers keep the logical length apart from the tokens they store.

`update()` only hands the new chunk to the registered attention function (kvpress/attention.py), which writes it
into the layer's segments and attends over what is stored: there is never a per-step concatenation of the whole
cache. Presses (which tokens to keep), codecs (how tokens are encoded) and stores (where they live) plug in here.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .compress import compress, observe_chunk
from .deferred import DeferredEncoding, full_prompt
from .segments import FLUSH_BLOCK, SegmentedKV

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class KVPressLayer(CacheLayerMixin):
    """One attention layer's compressed KV.

    Invariants: `logical_length` counts every position the model has seen (it drives positions/RoPE);
    `kv.length` counts the tokens actually held (<= logical after eviction or sliding), in logical order;
    rows attend to stored tokens `[kv_start[b], kv.length)` (earlier ones are padding or filler slots that keep
    storage rectangular); `n_pad[b]` is the number of padding tokens row b was given; `mass` (H2O) is aligned with
    the stored tokens.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, press: Any = None, quant: Any = None, sliding_window: int | None = None,
                 compress_every_chunk: bool = False) -> None:
        super().__init__()
        self.press = press
        self.compress_every_chunk = compress_every_chunk
        self.needs_compression = False
        self.window_queries: torch.Tensor | None = None  # last prompt queries a press observes (SnapKV)
        self.scaling: float | None = None  # softmax scale the model uses (set by the attention function)
        self.prefix = None  # SharedPrefix read in place from a PrefixCache (kvpress/prefix.py), or None
        self.deferred: DeferredEncoding | None = None  # prompt held in full precision until its last token (prefix.py)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.kv = SegmentedKV(quant)
        self.logical_length = 0
        self.kv_start: torch.Tensor | None = None  # (B,) int32; None when every stored token is attended
        self.n_pad: torch.Tensor | None = None  # (B,) int32 padding tokens per row; None when none
        self.mass: torch.Tensor | None = None  # (B, Hkv, T) float32 accumulated attention (H2O)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- transformers CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        if self.kv.quant is not None:
            self.kv.quant.check_head_dim(key_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash the new chunk for the attention function; return it tagged with this layer (no copy)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.kv.length and key_states.shape[0] != self.kv.batch_size:
            raise ValueError(
                f"This KVPressCache holds a batch of {self.kv.batch_size} sequences but got {key_states.shape[0]}; "
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
        if self.deferred is not None:  # back to the configured encoding, empty
            self.kv, self.press, self.deferred = SegmentedKV(self.deferred.quant), self.deferred.press, None
        self.kv.clear()
        self.logical_length = 0
        self.kv_start = self.n_pad = self.mass = self.pending = self.window_queries = None
        self.needs_compression = False
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.kv.batch_size if self.kv.length else (self.prefix.ends.shape[0] if self.prefix is not None else 0)
        if batch:
            self.index_batch(torch.arange(batch, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.index_batch(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last tokens (assisted decoding); only possible while nothing was evicted, slid or quantized."""
        if tokens_to_remove > 0:
            tokens_to_remove = self.logical_length - tokens_to_remove
        n = abs(tokens_to_remove)
        if n == 0:
            return
        if self.kv.length != self.logical_length or self.kv.quant is not None:
            raise ValueError("Cannot crop a compressed KVPressLayer: the cropped tokens are no longer stored as given.")
        self.kv.main.store.drop_back(n)
        self.logical_length -= n
        self._refresh_views()

    # --- storage operations used by kvpress.attention / kvpress.compress -------------------------------------
    @property
    def stored_length(self) -> int:
        return self.kv.length

    def index_batch(self, rows: torch.Tensor) -> None:
        """Select/reorder batch rows of every per-row tensor."""
        if self.prefix is not None:
            self.prefix.index_batch(rows)
        if self.deferred is not None and self.deferred.shared is not None:
            self.deferred.shared.index_batch(rows)
        if self.deferred is not None and self.deferred.window_queries is not None:
            queries = self.deferred.window_queries
            self.deferred.window_queries = queries.index_select(0, rows.to(queries.device))
        if not self.kv.length:
            return
        self.kv.index_batch(rows)
        for name in ("kv_start", "n_pad", "mass", "window_queries"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows.to(value.device)))
        self._refresh_views()

    def append(self, key: torch.Tensor, value: torch.Tensor, chunk_valid: torch.Tensor | None) -> None:
        """Store a new chunk and advance the logical length; track left padding per row."""
        max_pad = 0
        if chunk_valid is not None:  # prefill chunks only: decode steps never add padding (and never sync here)
            self._track_padding(chunk_valid, self.kv.length)
            if self.n_pad is not None and self.kv.quant is not None:
                max_pad = int(self.n_pad.max())
        self.kv.append(key, value, max_pad)
        if self.mass is not None:
            self.mass = torch.nn.functional.pad(self.mass, (0, key.shape[2]))
        self.logical_length += key.shape[2]
        self._refresh_views()

    def _track_padding(self, chunk_valid: torch.Tensor, n_past: int) -> None:
        q = chunk_valid.shape[1]
        n_pad = (q - chunk_valid.sum(dim=1)).to(torch.int32)
        positions = torch.arange(q, device=chunk_valid.device)
        if not torch.equal(chunk_valid, positions[None, :] >= n_pad[:, None]):
            raise ValueError(
                "KVPressCache supports left padding only (padding tokens before the real ones). "
                "Set tokenizer.padding_side = 'left'."
            )
        start = torch.zeros_like(n_pad) if self.kv_start is None else self.kv_start
        fully_padded = start == n_past  # rows that have seen nothing but padding so far
        if bool(((~fully_padded) & (n_pad > 0)).any()):
            raise ValueError("Padding tokens after real tokens are not supported; use left padding.")
        added = torch.where(fully_padded, n_pad, torch.zeros_like(n_pad))
        self.n_pad = added if self.n_pad is None else self.n_pad + added
        self.set_kv_start(start + added)

    def encode_deferred(self, query: torch.Tensor) -> None:
        """The prompt is complete: re-store its full-precision tokens (shared prefix read from its pages + this
        layer's private tokens) as one left-padded prefill chunk under the deferred press/quant: same segments,
        padding and observations as if the whole prompt had been prefilled at once."""
        deferred, self.deferred = self.deferred, None
        k, v, valid = full_prompt(self.prefix, self.kv.main.store, self.kv_start)
        self.prefix = None
        lo, hi = deferred.shared_slots
        if hi > lo:  # these quantized-middle slots are read from the shared pages instead of being stored
            k, v, valid = (torch.cat([t[:, :, :lo], t[:, :, hi:]], dim=2) for t in (k, v, valid[:, None]))
            valid = valid[:, 0]
            self.prefix = deferred.shared
        self.kv = SegmentedKV(deferred.quant)
        self.kv_start = self.n_pad = None
        logical, self.logical_length = self.logical_length, 0
        self.append(k, v, None if bool(valid.all()) else valid)
        self.logical_length = logical
        self.press = deferred.press
        if self.press is not None:
            self.window_queries = deferred.window_queries
            observe_chunk(self, query, self.scaling)

    def set_kv_start(self, start: torch.Tensor | None) -> None:
        """Record per-row first attended stored token; None when it is 0 everywhere (no masking needed)."""
        self.kv_start = start.to(torch.int32) if start is not None and bool((start > 0).any()) else None

    def valid_mask(self) -> torch.Tensor:
        """(B, T) bool: which stored tokens rows attend to."""
        t = torch.arange(self.kv.length, device=self.device)
        if self.kv_start is None:
            return t[None, :].expand(self.kv.batch_size, -1) >= 0
        return t[None, :] >= self.kv_start.to(self.device)[:, None]

    def slide(self) -> None:
        """Sliding-window layers keep only the last window - 1 tokens between forwards (as transformers does)."""
        excess = self.kv.length - (self.sliding_window - 1)
        if excess > 0:
            self.kv.main.store.drop_front(excess)
            if self.kv_start is not None:
                self.set_kv_start((self.kv_start - excess).clamp_(min=0))
            self._refresh_views()

    def _refresh_views(self) -> None:
        # transformers reads `.keys`/`.values` in a few places (batch size, offloading): expose views, not copies.
        fields = self.kv.main.store.fields
        self.keys = self.kv.main.store.view("k") if fields else None
        self.values = self.kv.main.store.view("v") if fields else None

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (store capacity, scales, fp window and bookkeeping included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.kv_start, self.n_pad, self.mass, self.window_queries) if t is not None]
        shared = self.prefix.tensors() if self.prefix is not None else []
        return self.kv.tensors() + extra + shared


class KVPressCache(Cache):
    """A transformers Cache that compresses: `KVPressCache(model.config, press=..., quant=..., paged=...)`.

    Requires the model to run the "kvpress" attention (kvpress.wrap does it). Sliding-window layers keep their
    window semantics and are neither pressed nor quantized (they are already bounded by their window).
    """

    def __init__(self, config, press: Any = None, quant: Any = None, paged: bool = False,
                 compress_every_chunk: bool = False) -> None:
        """`compress_every_chunk`: with chunked prefill, compress after every chunk (peak memory bounded by the
        budget + one chunk, but early chunks are judged without seeing the end of the prompt) instead of once the
        whole prompt is stored (default: best quality; peak memory = the full prompt)."""
        from .config import resolve_config

        self.kv_config = resolve_config(press=press, quant=quant, paged=paged)
        press, quant = self.kv_config.press, self.kv_config.quant
        _check_press_with_quant(press, quant)
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if unsupported:
            raise ValueError(
                f"KVPressCache supports attention layers of types {SUPPORTED_LAYER_TYPES}; this model has {unsupported}."
            )
        n_heads = text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        self.num_key_value_heads = getattr(text_config, "num_key_value_heads", None) or n_heads
        if quant is not None:
            quant.check_head_dim(self.head_dim)
        layers = []
        for layer_type, kwargs in zip(layer_types, layer_kwargs):
            window = kwargs.get("sliding_window") if layer_type != "full_attention" else None
            if window:
                layers.append(KVPressLayer(sliding_window=window))
            else:
                layers.append(KVPressLayer(press=press, quant=quant, compress_every_chunk=compress_every_chunk))
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
        batch = max((layer.kv.batch_size for layer in layers if layer.kv.length), default=0)
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
            "quant": str(self.kv_config.quant) if self.kv_config.quant is not None else None,
        }

    def compress(self) -> None:
        """Compress now what the press has observed (normally done at the first decode step); e.g. after
        prefilling a context that several questions will reuse."""
        for layer in self.layers:
            if isinstance(layer, KVPressLayer) and layer.needs_compression:
                compress(layer, layer.scaling)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for tests and memory audits)."""
        return [t for layer in self.layers for t in layer.tensors()]


def _check_press_with_quant(press: Any, quant: Any) -> None:
    """Decode-time eviction only touches the quantized middle: the bound must leave room for the fp segments."""
    max_tokens = getattr(press, "max_tokens", None)
    if press is None or quant is None or max_tokens is None:
        return
    floor = quant.n_sink + quant.residual + FLUSH_BLOCK
    if max_tokens <= floor:
        raise ValueError(
            f"max_tokens={max_tokens} leaves no room for quantized tokens next to the {quant.n_sink} fp sink and up to "
            f"{quant.residual + FLUSH_BLOCK} fp window tokens; raise max_tokens above {floor} or lower quant residual."
        )
