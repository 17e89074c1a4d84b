"""KVPressCache: a transformers `Cache` whose layers keep the logical length apart from the tokens they store.

`update()` only hands the new chunk to the registered attention function (kvpress/attention.py), which writes it
into the layer's segments and attends over what is stored: there is never a per-step concatenation of the whole
cache. Presses (which tokens to keep), codecs (how tokens are encoded) and stores (where they live) plug in here.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .compress import complement, row_budgets, select_with_fillers
from .deferred import DeferredEncoding, full_prompt
from .hf_compat import layer_types_and_kwargs
from .presses.state import EvictionSpan, PrefillChunk, PressState
from .segments import FLUSH_BLOCK, SegmentedKV, SharedPrefix

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# config attributes whose non-None value changes the attention math in a way the kvpress attention does not implement
UNSUPPORTED_ATTENTION_SETTINGS = {"attn_logit_softcapping": "attention logit softcapping"}


class KVPressLayer(CacheLayerMixin):
    """One attention layer's compressed KV; the only writer of its own fields.

    Invariants: `logical_length` counts every position the model has seen (it drives positions/RoPE);
    `kv.length` counts the tokens actually held (<= logical after eviction or sliding), in logical order;
    rows attend to stored tokens `[kv_start[b], kv.length)` (earlier ones are padding or filler slots that keep
    storage rectangular); `n_pad[b]` is the number of padding tokens row b was given; the press's state
    (`press_state`, made by the press) follows the stored tokens through its hooks; `layer_idx` of `n_layers`
    places the layer among the cache's pressed layers (per-layer budgets: BasePress.layer_budget).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, press: Any = None, quant: Any = None, sliding_window: int | None = None,
                 compress_every_chunk: bool = False, layer_idx: int = 0, n_layers: int = 1) -> None:
        super().__init__()
        self.press = press
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self._state: PressState | None = press.new_state() if press is not None else None
        self.compress_every_chunk = compress_every_chunk
        self.needs_compression = False  # the press observed tokens it has not compressed yet
        self.compressed_once = False  # a per-head compression ran: later chunks are stored as they come
        self._sm_scale: float | None = None  # softmax scale of the model, from the last observed chunk
        self.prefix: SharedPrefix | None = None  # read in place from a PrefixCache (kvpress/prefix.py), or None
        self.deferred: DeferredEncoding | None = None  # prompt held in full precision until its last token (prefix.py)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.kv = SegmentedKV(quant)
        self.logical_length = 0
        self.kv_start: torch.Tensor | None = None  # (B,) int32; None when every stored token is attended
        self.n_pad: torch.Tensor | None = None  # (B,) int32 padding tokens per row; None when none
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prompt_length: int | None = None  # positions of the prompt when known (a 1-token chunk may be prompt)

    # --- transformers CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._initialize_like(key_states)
        if self.kv.quant is not None:
            self.kv.quant.check_head_dim(key_states.shape[-1])

    def _initialize_like(self, keys: torch.Tensor) -> None:
        self.dtype, self.device, self.head_dim = keys.dtype, keys.device, keys.shape[-1]
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

    get_max_cache_shape = get_max_length  # its name before transformers 5.13

    def reset(self) -> None:
        if self.deferred is not None:  # back to the configured encoding, empty
            self.kv, self.press, self.deferred = SegmentedKV(self.deferred.quant), self.deferred.press, None
        self.kv.clear()
        self.logical_length = 0
        self.kv_start = self.n_pad = self.pending = None
        self._state = self.press.new_state() if self.press is not None else None
        self.needs_compression = self.compressed_once = False
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
        """Remove the last tokens (assisted decoding); only possible while nothing was evicted, slid or quantized.

        transformers' two conventions: a negative value removes that many tokens from the end; a positive one (the
        legacy `crop(max_length)`) keeps the first max_length tokens, so nothing is removed when the layer is not
        longer; 0 removes nothing (transformers 5.24's generate calls crop(0) as a no-op)."""
        if tokens_to_remove > 0:
            n = max(0, self.logical_length - tokens_to_remove)
        else:
            n = min(-tokens_to_remove, self.logical_length)
        if n == 0:
            return
        if self.kv.length != self.logical_length or self.kv.quant is not None:
            raise ValueError("Cannot crop a compressed KVPressLayer: the cropped tokens are no longer stored as given.")
        self.kv.main.store.drop_back(n)
        self.logical_length -= n
        self._refresh_views()

    # --- the attention function's calls (kvpress/attention.py) ---------------------------------------------------
    def consume(self, key: torch.Tensor) -> bool:
        """Whether `key` is the chunk update() stashed; if so it is taken (the attention function stores it)."""
        if self.pending is None or self.pending[0] is not key:
            return False
        self.pending = None
        return True

    def before_decode(self) -> None:
        """Decode-time eviction: before the next token is stored, either re-compress through the press's score
        (`press.every`: once the layer holds `every` tokens more than its budget), or drop the tokens the press's
        state chooses from the quantized middle (or the only segment), so that segments stay rectangular (H2O)."""
        if self._state is None or self.kv.pressed is not None:
            return
        if self.press.every is not None:
            if self.kv.length - max(self._row_budgets()) >= self.press.every:
                self.compress()
            return
        kv = self.kv
        start = kv.sink.length if kv.sink is not None else 0
        stop = start + kv.main.length
        span = EvictionSpan(kv.length, start, stop, lambda: None if self.kv_start is None else self.valid_mask())
        victims = self._state.decode_victims(span)
        if victims is None:
            return
        keep = complement(victims, stop - start)
        kv.evict_main(keep)
        self._state.kept(keep, start, stop)
        if self.kv_start is not None:
            start_main = (self.kv_start.to(victims.device) - start).clamp(min=0)
            evicted_pad = (victims[:, 0] < start_main[:, None]).sum(dim=1)
            self.set_kv_start(self.kv_start - evicted_pad.to(self.kv_start.device))
        self._refresh_views()

    def wants_decode_logits(self) -> bool:
        """Whether the decode attention must hand this step's logits to observe_decode (H2O accumulates mass)."""
        return self._state is not None and self.kv.pressed is None and self._state.wants_decode_logits()

    def observe_decode(self, scores: torch.Tensor, lse: torch.Tensor) -> None:
        """The decode step's float32 logits (B, Hq, stored_length) in the log2 domain and its lse (B, Hq), natural
        log, over every stored token (the new one included), for the press's state."""
        self._state.observe_decode(scores, lse, self.kv_start)

    def wants_prefill_mass(self) -> bool:
        """Whether the attention of a prefill chunk should hand its probability mass to finish_forward (H2O)."""
        return (self._state is not None and self.deferred is None and not self.compressed_once
                and self._state.wants_prefill_mass())

    def finish_forward(self, query: torch.Tensor, sm_scale: float, mass: torch.Tensor | None = None) -> None:
        """After attending the chunk of this forward: encode a deferred prompt (its last token was just attended),
        or let the press observe a stored prefill chunk (and compress now with compress_every_chunk); slide.
        `mass`: the chunk's attention probability mass (B, Hkv, T), when the attention computed it."""
        if self.deferred is not None:
            self._encode_deferred(query, sm_scale)
            return
        if self.press is not None and not self.compressed_once and (query.shape[2] > 1 or self._prompt_chunk()):
            self._observe_prefill(query, sm_scale, mass)
            if self.compress_every_chunk:
                self.compress()
        elif self.press is not None and self.press.every is not None:  # a decode step: re-scoring presses see it
            self._sm_scale = sm_scale
            self._state.observe_query(query)
        if self.is_sliding:
            self.slide()

    def expect_prompt(self, n_positions: int) -> None:
        """The prompt spans `n_positions` positions (KVPressCache.expect_prompt)."""
        self.prompt_length = n_positions

    def _prompt_chunk(self) -> bool:
        """Whether the one-token chunk just stored is the prompt's last (a chunked prefill's 1-token tail) rather
        than a decode step: the press observes it as prefill (unless it takes decode logits, as H2O does)."""
        return (self.prompt_length is not None and self.logical_length <= self.prompt_length
                and not self.wants_decode_logits())

    def append(self, key: torch.Tensor, value: torch.Tensor, chunk_valid: torch.Tensor | None) -> None:
        """Store a new chunk and advance the logical length; track left padding per row."""
        self._store(key, value, chunk_valid)
        self.logical_length += key.shape[2]

    # --- compression ------------------------------------------------------------------------------------------
    @property
    def press_state(self) -> PressState | None:
        """What the press observed on this layer (made and updated by the press; read-only here)."""
        return self._state

    def stored_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read-only: full-precision K, V (B, H, T, D) of every stored token in logical order (dequantized when
        quantized; views when not) and the (B, T) attended-token mask (presses that replay the context: KVzip)."""
        keys, values = self.kv.dequantized(self.head_dim, self.dtype)
        return keys, values, self.valid_mask()

    def compress(self) -> None:
        """Score every stored token and keep each row's budget (same count per head); frees the evicted memory.

        All or nothing: if scoring or selection raises, the layer is unchanged and still needs compression (the
        next decode step retries, and raises again, rather than silently keeping every token)."""
        press, kv = self.press, self.kv
        budgets = self._row_budgets()
        n_keep = max(budgets)
        if press.per_head_budgets:
            ranked = self.ranked_scores() if n_keep < kv.length else None
            self.keep_per_head(press.keep_masks([ranked], budgets)[0] if ranked is not None else None)
            return
        if n_keep < kv.length:
            k_all, v_all = kv.dequantized(self.head_dim, self.dtype)
            valid = self.valid_mask()
            scores = press.score(self._state.scoring_inputs(k_all, v_all, valid, self._sm_scale))
            idx, fillers = select_with_fillers(press, scores, valid, budgets, n_keep)
            kv.keep(idx, k_all, v_all, n_masked=int(fillers.max()))
            self._state.kept(idx)
            self.set_kv_start(fillers)
            self._refresh_views()
        self._state.compressed()
        self.needs_compression = False

    def ranked_scores(self) -> torch.Tensor:
        """(B, Hkv, T) float32 ranking of the press's scores of every stored token (padding -inf, forced tokens +inf):
        what a per-head compression selects from (this layer alone, or with every layer for budget=global)."""
        k_all, v_all = self.kv.dequantized(self.head_dim, self.dtype)
        valid = self.valid_mask()
        scores = self.press.score(self._state.scoring_inputs(k_all, v_all, valid, self._sm_scale))
        return self.press.rank(scores, valid)

    def keep_per_head(self, keep: torch.Tensor | None) -> None:
        """Keep tokens keep (B, Hkv, T) bool of the stored ones, each (row, head) at its own length (SegmentedKV.
        keep_per_head); None: the budget keeps every token and the storage stays as it is. Either way the prompt is
        compressed: later chunks are stored as they come."""
        if keep is not None:
            k_all, v_all = self.kv.dequantized(self.head_dim, self.dtype)
            self.kv.keep_per_head(keep, k_all, v_all)
            self.set_kv_start(None)
            self._refresh_views()
        self._state.compressed()
        self.needs_compression = False
        self.compressed_once = True

    def _row_budgets(self) -> list[int]:
        """Tokens each row keeps at a compression now (compress.row_budgets for this layer's place)."""
        batch = self.kv.batch_size
        n_pad = self.n_pad.tolist() if self.n_pad is not None else [0] * batch
        start = self.kv_start.tolist() if self.kv_start is not None else [0] * batch
        return row_budgets(self.press, self.logical_length, self.kv.length, n_pad, start, self.layer_idx,
                           self.n_layers)

    def _observe_prefill(self, query: torch.Tensor, sm_scale: float, mass: torch.Tensor | None = None) -> None:
        """The press's state observes the chunk just stored (its queries are the last query.shape[2] positions)."""
        kv = self.kv
        self._sm_scale = sm_scale
        chunk = PrefillChunk(query, sm_scale, kv.length - query.shape[2],
                             keys=lambda: kv.dequantized(query.shape[-1], query.dtype)[0], valid=self.valid_mask,
                             mass=mass)
        self._state.observe_prefill(chunk)
        self.needs_compression = True

    # --- prefix sharing (kvpress/prefix.py) ---------------------------------------------------------------------
    def attach_prefix(self, prefix: SharedPrefix, logical_length: int | None = None) -> None:
        """Read a shared prompt prefix in place (its full-precision pages give dtype, device and head_dim); with
        `logical_length`, the layer has seen that many positions."""
        self.prefix = prefix
        self._initialize_like(prefix.fields["k"])
        if logical_length is not None:
            self.logical_length = logical_length

    def load(self, keys: torch.Tensor | None, values: torch.Tensor | None, kv_start: torch.Tensor,
             logical_length: int) -> None:
        """Fill an empty layer with full-precision tokens (B, H, T, D) stored as given (rows attend
        [kv_start[b], T)) at `logical_length`, without observing them (prefix sharing assembles rows computed
        apart); keys None: nothing stored."""
        if keys is not None:
            self.kv.append(keys, values)
            self._initialize_like(keys)
            if self._state is not None:
                self._state.appended(keys.shape[2])
        self.set_kv_start(kv_start)
        self.logical_length = logical_length
        self._refresh_views()

    def defer_encoding(self, state: PressState | None = None, shared: SharedPrefix | None = None,
                       shared_slots: tuple[int, int] = (0, 0)) -> None:
        """Hold the prompt in full precision (no press, no quantization) until its last token has been attended,
        then encode it as configured: `state` holds what the press observed of the prompt before (None: a fresh
        state), `shared` the quantized codes read in place instead of stored slots shared_slots[0]:[1]."""
        self.deferred = DeferredEncoding(self.press, self.kv.quant, state, shared, shared_slots)
        self.press, self._state, self.kv = None, None, SegmentedKV(None)

    def _encode_deferred(self, query: torch.Tensor, sm_scale: float) -> None:
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
        self._store(k, v, None if bool(valid.all()) else valid)  # the logical length already counts the prompt
        self.press = deferred.press
        if self.press is not None:
            self._state = deferred.state if deferred.state is not None else self.press.new_state()
            self._observe_prefill(query, sm_scale)

    # --- storage ----------------------------------------------------------------------------------------------
    @property
    def stored_length(self) -> int:
        """Tokens held per (row, head): the segments' plus, after a per-head compression, its mean per head."""
        pressed = self.kv.pressed
        return self.kv.length + (round(pressed.mean_tokens()) if pressed is not None else 0)

    def index_batch(self, rows: torch.Tensor) -> None:
        """Select/reorder batch rows of every per-row tensor."""
        if self.prefix is not None:
            self.prefix.index_batch(rows)
        if self.deferred is not None and self.deferred.shared is not None:
            self.deferred.shared.index_batch(rows)
        if self.deferred is not None and self.deferred.state is not None:
            self.deferred.state.index_batch(rows)
        if not self.kv.length:
            return
        self.kv.index_batch(rows)
        for name in ("kv_start", "n_pad"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows.to(value.device)))
        if self._state is not None:
            self._state.index_batch(rows)
        self._refresh_views()

    def _store(self, key: torch.Tensor, value: torch.Tensor, chunk_valid: torch.Tensor | None) -> None:
        """Store tokens after the stored ones without moving the logical length; track left padding per row."""
        max_pad = 0
        if chunk_valid is not None:  # prefill chunks only: decode steps never add padding (and never sync here)
            self._track_padding(chunk_valid, self.kv.length)
            if self.n_pad is not None and self.kv.quant is not None:
                max_pad = int(self.n_pad.max())
        self.kv.append(key, value, max_pad)
        if self._state is not None:
            self._state.appended(key.shape[2])
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
        extra = [t for t in (self.kv_start, self.n_pad) if t is not None]
        state = self._state.tensors() if self._state is not None else []
        shared = self.prefix.tensors() if self.prefix is not None else []
        return self.kv.tensors() + extra + state + shared


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

        from .config import head_dim_of

        text_config = config.get_text_config(decoder=True)
        self.head_dim = head_dim_of(text_config)
        self.kv_config = resolve_config(press=press, quant=quant, paged=paged, head_dim=self.head_dim)
        press, quant = self.kv_config.press, self.kv_config.quant
        _check_press_with_quant(press, quant)
        if compress_every_chunk and press is not None and press.per_head_budgets:
            raise ValueError(f"compress_every_chunk cannot be combined with budget={press.budget}: per-head budgets "
                             "compress the prompt once, when it is complete. Use budget=uniform or compress once.")
        check_text_config(text_config, self.kv_config)
        layer_types, layer_kwargs = layer_types_and_kwargs(text_config)
        self.num_key_value_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        windows = [kwargs.get("sliding_window") if layer_type != "full_attention" else None
                   for layer_type, kwargs in zip(layer_types, layer_kwargs)]
        n_pressed = sum(1 for window in windows if not window)  # per-layer budgets share over these layers
        layers = []
        for window in windows:
            if window:
                layers.append(KVPressLayer(sliding_window=window))
            else:
                layers.append(KVPressLayer(press=press, quant=quant, compress_every_chunk=compress_every_chunk,
                                           layer_idx=sum(not made.is_sliding for made in layers), n_layers=n_pressed))
        super().__init__(layers=layers)
        self._last_layer: KVPressLayer | None = None
        self.prompt_length: int | None = None  # positions of the prompt, when known (expect_prompt)
        self._model: weakref.ref | None = None  # the model whose generate uses this cache (attach_model)
        self.prompt_ids: torch.Tensor | None = None  # (B, T) token ids of the stored prompt, left padding included

    def record_prompt_ids(self, input_ids: torch.Tensor) -> None:
        """Remember the prompt's token ids (B, T), left padding included, for presses that replay the context when
        they compress (KVzip); wrap's generate and the kv-press pipeline call it."""
        self.prompt_ids = input_ids

    def attach_model(self, model) -> None:
        """Remember (weakly) the model that runs on this cache, so that the compression at the first decode step can
        hand it to the press (`BasePress.prepare_compression`: KVzip replays the context through it). kvpress.wrap's
        generate attaches its model to the cache it builds or is given."""
        self._model = weakref.ref(model)

    def expect_prompt(self, n_positions: int) -> None:
        """The prompt spans `n_positions` positions (past ones included): compress only once they are all stored.
        A chunked prefill may end with a one-token chunk, which looks like a decode step; without this call such a
        chunk would compress before the prompt's last token attends (kvpress.wrap's generate calls it)."""
        self.prompt_length = n_positions
        for layer in self.layers:
            layer.expect_prompt(n_positions)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        last = self._last_layer
        if last is not None and last.pending is not None:
            last.pending = None
            raise RuntimeError(
                "KVPressCache needs the model to use the 'kvpress' attention: call `kvpress.wrap(model)` (or "
                "`model.set_attn_implementation('kvpress')` after `import kvpress`) before generating with it."
            )
        if layer_idx == 0:
            self._check_not_torn()
        layer = self.layers[layer_idx]
        if key_states.shape[2] == 1 and layer.needs_compression and layer.logical_length >= (self.prompt_length or 0):
            self.compress()  # the prompt is complete: compress every layer before the first decode step
        self._last_layer = layer
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_not_torn(self) -> None:
        """At the start of a forward every layer that has seen tokens has seen the same positions; otherwise an
        earlier forward raised midway (some layers stored its chunk, others not) and the cache must not be used."""
        lengths = {layer.logical_length for layer in self.layers if layer.is_initialized}
        if len(lengths) > 1:
            raise RuntimeError(
                f"This KVPressCache was left mid-forward by an earlier exception (its layers hold {min(lengths)} to "
                f"{max(lengths)} positions); call cache.reset() or use a fresh cache."
            )

    def stats(self) -> dict[str, Any]:
        """Memory accounting from the tensors actually held, beside what a 16-bit DynamicCache would hold."""
        layers = [layer for layer in self.layers if isinstance(layer, KVPressLayer)]
        batch = max((layer.kv.batch_size for layer in layers if layer.kv.length), default=0)
        nbytes = sum(t.numel() * t.element_size() for t in self.tensors())
        per_token_head_fp16 = 2 * self.head_dim * 2  # K and V, 2 bytes each
        dynamic_tokens = [
            min(layer.logical_length, layer.sliding_window - 1) if layer.is_sliding else layer.logical_length
            for layer in layers
        ]
        fp16_nbytes = sum(batch * self.num_key_value_heads * t * per_token_head_fp16 for t in dynamic_tokens)
        full = [layer for layer in layers if not layer.is_sliding] or layers
        applied = {"press": [i for i, layer in enumerate(layers) if _configured(layer, "press")],
                   "quant": [i for i, layer in enumerate(layers) if _configured(layer, "quant")]}
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
            "applied_to_layers": applied,  # which layers the press / quant apply to (sliding layers: neither)
        }

    def compress(self, model=None) -> None:
        """Compress now what the press has observed (done at the first decode step; e.g. after prefilling a context
        that several questions will reuse). Each press first gets `prepare_compression(cache, model)` (`model`:
        this argument, else the attached one, else None), then every layer with observed tokens compresses."""
        layers = [layer for layer in self.layers if isinstance(layer, KVPressLayer) and layer.needs_compression]
        if not layers:
            return
        if model is None and self._model is not None:
            model = self._model()
        presses = {id(layer.press): layer.press for layer in layers}
        for press in presses.values():
            press.prepare_compression(self, model)
        for press in presses.values():
            if press.budget == "global":
                _compress_global([layer for layer in layers if layer.press is press])
        for layer in layers:
            if layer.needs_compression:
                layer.compress()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, each once (layers may share one, e.g. a prefix's block table)."""
        distinct = {id(t): t for layer in self.layers for t in layer.tensors()}
        return list(distinct.values())


def _compress_global(layers: list[KVPressLayer]) -> None:
    """budget=global: each row keeps (its per-layer budget x kv heads x layers) tokens in all, chosen by score over
    every layer and head at once (KVzip's allocation); each layer then stores its heads at their own lengths."""
    budgets = layers[0]._row_budgets()
    if max(budgets) >= layers[0].kv.length:
        masks = [None] * len(layers)
    else:
        masks = layers[0].press.keep_masks([layer.ranked_scores() for layer in layers], budgets)
    for layer, keep in zip(layers, masks):
        layer.keep_per_head(keep)


def _configured(layer: KVPressLayer, part: str) -> bool:
    """Whether the configured press / quant ("press" or "quant") applies to `layer` (also while deferred)."""
    if layer.deferred is not None:
        return getattr(layer.deferred, part) is not None
    return (layer.press if part == "press" else layer.kv.quant) is not None


def check_text_config(text_config, kv_config) -> None:
    """Refuse, before any work, a decoder the kvpress attention cannot run exactly with `kv_config`: layer types
    other than full / sliding (Llama 4's chunked attention is not a sliding window), attention settings it does not
    implement (logit softcapping), and a press or quantization on a model whose every layer slides (sliding layers
    keep their window and are never pressed or quantized, so the setting would do nothing)."""
    layer_types, _ = layer_types_and_kwargs(text_config)
    unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if unsupported:
        raise ValueError(
            f"kvpress supports attention layers of types {SUPPORTED_LAYER_TYPES}; this model has {unsupported} "
            "(chunked attention, e.g. Llama 4, attends within fixed chunks, which kvpress does not implement)."
        )
    for attr, what in UNSUPPORTED_ATTENTION_SETTINGS.items():
        if getattr(text_config, attr, None) is not None:
            raise ValueError(f"kvpress attention does not implement {what} ({attr}={getattr(text_config, attr)!r}, "
                             "e.g. Gemma2); this model cannot be wrapped.")
    configured = [name for name in ("press", "quant") if getattr(kv_config, name) is not None]
    if configured and layer_types and all(t == "sliding_attention" for t in layer_types):
        raise ValueError(
            f"every attention layer of this model uses a sliding window, and kvpress neither presses nor quantizes "
            f"sliding layers (they are bounded by their window), so {' and '.join(configured)} would do nothing; "
            "wrap it without them (or load the model without a sliding window)."
        )


def _check_press_with_quant(press: Any, quant: Any) -> None:
    """Decode-time eviction only touches the quantized middle: a press's bound must leave room for the fp segments."""
    if press is not None and quant is not None:
        window = quant.residual + FLUSH_BLOCK
        press.check_fp_slots(quant.n_sink + window, f"the {quant.n_sink} fp sink and up to {window} fp window tokens")
