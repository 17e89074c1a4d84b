"""A layer's stored tokens as runs ("segments") that are contiguous in logical order, each with one encoding.

Unquantized layers have one fp segment. Quantized layers have three: the first `n_sink` tokens in full precision,
the quantized middle, and a full-precision window of the most recent tokens that is flushed to the middle in blocks.
Attention is order-free, so the segments are attended as separate stores whose partial results merge exactly (at decode,
all of them in one fused kernel: decode_attention_multi); presses see the concatenation in logical order.
"""
from __future__ import annotations

import torch

from .kernels import attention_scores, decode_attention, extend_attention, quantize_store
from .paged.contiguous import ContiguousStore
from .quant.codec import dequantize, quantize

_SIXTEEN_BIT = torch.float16
FLUSH_BLOCK = 16  # window tokens quantized together once the window holds residual + FLUSH_BLOCK tokens


class Segment:
    """One run of tokens: a contiguous store plus how its tokens are encoded (bits 16 = unquantized)."""

    def __init__(self, k_bits: int = 16, v_bits: int = 16, k_group: int | None = None, v_group: int | None = None,
                 fp_dtype: torch.dtype | None = None, max_tokens: int | None = None):
        self.store = ContiguousStore(max_tokens)
        self.k_bits, self.v_bits, self.k_group, self.v_group = k_bits, v_bits, k_group, v_group
        self.fp_dtype = fp_dtype  # dtype for fp32 inputs (16-bit inputs are kept as they are); None: unchanged
        self._start_cache: tuple | None = None  # (layer kv_start, its version, offset, kv_start - offset)
        self._span_cache: tuple | None = None  # (layer kv_start, key, (start, end)) of the last span()

    @property
    def quantized(self) -> bool:
        return self.k_bits < 16

    @property
    def length(self) -> int:
        return self.store.length

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode tokens (B, H, N, D) into this segment's fields."""
        if not self.quantized:
            dtype = self.fp_dtype if (self.fp_dtype is not None and k.dtype == torch.float32) else k.dtype
            return {"k": k.to(dtype), "v": v.to(dtype)}
        kq, ks, kz = quantize(k, self.k_bits, self.k_group)
        vq, vs, vz = quantize(v, self.v_bits, self.v_group)
        return {"k": kq, "k_scale": ks, "k_zero": kz, "v": vq, "v_scale": vs, "v_zero": vz}

    def decode(self, fields: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype):
        """Full-precision (K, V) of encoded fields."""
        if not self.quantized:
            return fields["k"], fields["v"]
        k = dequantize(fields["k"], fields["k_scale"], fields["k_zero"], self.k_bits, self.k_group, head_dim, dtype)
        v = dequantize(fields["v"], fields["v_scale"], fields["v_zero"], self.v_bits, self.v_group, head_dim, dtype)
        return k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode and store tokens at the end; quantized tokens are written in place by the quantize-and-store
        kernel (Triton on CUDA), so no encoded copy is made first."""
        store = self.store
        if not store.fields:  # first write: exact-size allocation
            store.append(self.encode(k, v))
            return
        if not self.quantized:  # writing into the existing fields casts (no separate conversion op)
            store.append({"k": k, "v": v})
            return
        n = k.shape[2]
        store.reserve(n)
        fields, table = store.fields, store.block_table()
        dst = torch.full((k.shape[0],), store.length, dtype=torch.int32, device=k.device)
        for x, name, bits, group in ((k, "k", self.k_bits, self.k_group), (v, "v", self.v_bits, self.v_group)):
            quantize_store(x, fields[name], fields[f"{name}_scale"], fields[f"{name}_zero"], table, dst, bits, group,
                           check_values=False)
        store.advance(n)

    def views(self) -> dict[str, torch.Tensor]:
        return {name: self.store.view(name) for name in self.store.fields}

    def kernel_args(self) -> tuple:
        f = self.store.fields
        return (f["k"], f["v"], f.get("k_scale"), f.get("k_zero"), f.get("v_scale"), f.get("v_zero"),
                self.store.block_table())

    def span(self, kv_start: torch.Tensor | None, offset: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row [start, end) of this segment's attended tokens, given the layer-wide padding start; the tensors
        are reused while the inputs and the length stay the same (read-only)."""
        key = (None if kv_start is None else kv_start._version, offset, self.length, batch, device)
        cached = self._span_cache
        if cached is not None and cached[0] is kv_start and cached[1] == key:
            return cached[2]
        end = torch.full((batch,), self.length, dtype=torch.int32, device=device)
        if kv_start is None:
            span = torch.zeros_like(end), end
        else:
            span = (kv_start.to(device) - offset).clamp(0, self.length).to(torch.int32), end
        self._span_cache = (kv_start, key, span)
        return span

    def store_args(self, kv_start: torch.Tensor | None, offset: int) -> tuple:
        """This segment as one store of decode_attention_multi, given the layer-wide padding start.

        Bounds cost no per-step tensor op: the end is the int length, the start 0 without padding, else the layer's
        kv_start shifted by `offset` - built once per (kv_start, offset) and reused - which the kernel clamps into
        [0, length]."""
        if kv_start is None:
            start = 0
        elif offset == 0:
            start = kv_start
        else:
            cached = self._start_cache
            if cached is None or cached[0] is not kv_start or cached[1] != kv_start._version or cached[2] != offset:
                cached = self._start_cache = (kv_start, kv_start._version, offset, kv_start - offset)
            start = cached[3]
        return (*self.kernel_args(), start, self.length, self.k_bits, self.v_bits, self.k_group, self.v_group)

    def attend(self, q: torch.Tensor, kv_start, offset: int, sm_scale: float):
        """Partial attention (out, lse) of q (B, Hq, Q, D) over this segment."""
        start, end = self.span(kv_start, offset, q.shape[0], q.device)
        k, v, ks, kz, vs, vz, table = self.kernel_args()
        args = (k, v, ks, kz, vs, vz, table, start, end, sm_scale, self.k_bits, self.v_bits, self.k_group, self.v_group)
        if q.shape[2] == 1:
            out, lse = decode_attention(q[:, :, 0], *args)
            return out[:, :, None], lse[:, :, None]
        return extend_attention(q, *args)

    def scores(self, q: torch.Tensor, lse: torch.Tensor, kv_start, offset: int, sm_scale: float) -> torch.Tensor:
        """Attention probability mass per token of this segment (B, Hkv, length), given the final lse."""
        start, end = self.span(kv_start, offset, q.shape[0], q.device)
        f = self.store.fields
        return attention_scores(q, f["k"], f.get("k_scale"), f.get("k_zero"), self.store.block_table(), start, end,
                                lse, sm_scale, self.k_bits, self.k_group)


class SegmentedKV:
    """The ordered segments of one layer and the operations that keep them in logical order."""

    def __init__(self, quant=None) -> None:
        self.quant = quant
        if quant is None:
            self.sink = None
            self.main = Segment()
            self.window = None
        else:
            # The full-precision sinks and window are 16-bit (fp16 for fp32 models): precision far above the
            # quantized middle at a quarter of fp32's bytes.
            self.sink = Segment(fp_dtype=_SIXTEEN_BIT, max_tokens=quant.n_sink)
            self.main = Segment(quant.k_bits, quant.v_bits, quant.k_group_size, quant.group_size)
            self.window = Segment(fp_dtype=_SIXTEEN_BIT, max_tokens=quant.residual + FLUSH_BLOCK)
        # fp sink slots: n_sink plus the batch's largest left padding (or leading filler slots after a press), so
        # that every row's first n_sink real tokens stay full precision, as in its batch-1 run
        self.n_sink = quant.n_sink if quant is not None else 0

    @property
    def segments(self) -> list[Segment]:
        return [s for s in (self.sink, self.main, self.window) if s is not None]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def batch_size(self) -> int:
        return max(s.store.batch_size for s in self.segments)

    def offsets(self) -> list[tuple[Segment, int]]:
        out, offset = [], 0
        for seg in self.segments:
            out.append((seg, offset))
            offset += seg.length
        return out

    def append(self, k: torch.Tensor, v: torch.Tensor, max_pad: int = 0) -> None:
        """Store new tokens at the logical end: sinks first, the newest `residual` in the fp window, rest quantized.

        `max_pad`: the largest number of leading padding slots of any row so far; while only sinks are stored, the
        sink segment grows to n_sink + max_pad slots so that padded rows keep their own first tokens in fp."""
        if self.quant is None:
            self.main.store.append({"k": k, "v": v})
            return
        if not self.main.length and not self.window.length:  # sinks may still grow (never shrink)
            self._set_sink_slots(max(self.n_sink, self.quant.n_sink + max_pad))
        n_sink = max(0, min(self.n_sink - self.sink.length, k.shape[2]))
        if n_sink:
            self.sink.append(k[:, :, :n_sink], v[:, :, :n_sink])
            k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        n = k.shape[2]
        if not n:
            return
        # Decode lets the window overshoot by one block so flushes (and their quantize calls) come in blocks.
        limit = self.quant.residual + (FLUSH_BLOCK if n == 1 else 0)
        excess = self.window.length + n - self.quant.residual
        if self.window.length + n > limit and excess > 0:
            from_window = min(excess, self.window.length)
            if from_window:
                old_k = self.window.store.view("k")[:, :, :from_window]
                old_v = self.window.store.view("v")[:, :, :from_window]
                self.main.append(old_k, old_v)
                self.window.store.drop_front(from_window)
            from_chunk = excess - from_window
            if from_chunk:  # chunk tokens that are already too old for the window go straight to the middle
                self.main.append(k[:, :, :from_chunk], v[:, :, :from_chunk])
                k, v = k[:, :, from_chunk:], v[:, :, from_chunk:]
        if k.shape[2]:
            self.window.append(k, v)

    def dequantized(self, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K, V (B, H, T, D) of every stored token in logical order (views when unquantized)."""
        if self.quant is None:
            return self.main.store.view("k"), self.main.store.view("v")
        ks, vs = [], []
        for seg in self.segments:
            if seg.length:
                k, v = seg.decode(seg.views(), head_dim, dtype)
                ks.append(k.to(dtype))
                vs.append(v.to(dtype))
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _set_sink_slots(self, n: int) -> None:
        self.n_sink = n
        self.sink.store.max_tokens = n

    def keep(self, idx: torch.Tensor, k_all: torch.Tensor | None = None, v_all: torch.Tensor | None = None,
             n_masked: int = 0) -> None:
        """Keep tokens idx (B, H, K) of the logical order; re-split into sink / quantized / window segments
        (`n_masked`: the largest number of leading masked filler slots of a row; they widen the fp sinks).

        Tokens that stay quantized keep their codes (never re-quantized); fp tokens entering the middle are encoded.
        """
        if self.quant is None:
            self.main.store.keep(idx)
            return
        n_keep = idx.shape[2]
        self._set_sink_slots(self.quant.n_sink + n_masked)
        n_sink = min(self.n_sink, n_keep)
        n_window = min(self.quant.residual, n_keep - n_sink)
        n_main = n_keep - n_sink - n_window
        if n_main:
            candidates = self._quantized_candidates(k_all, v_all)
            main_idx = idx[:, :, n_sink : n_sink + n_main]
            fields = {name: _gather(t, main_idx) for name, t in candidates.items()}
            self.main.store.clear()
            self.main.store.append(fields)
        else:
            self.main.store.clear()
        for seg, sel in ((self.sink, idx[:, :, :n_sink]), (self.window, idx[:, :, n_keep - n_window :])):
            seg.store.clear()
            if sel.shape[2]:
                seg.store.append(seg.encode(_gather(k_all, sel), _gather(v_all, sel)))

    def _quantized_candidates(self, k_all: torch.Tensor, v_all: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantized fields of every stored token in logical order: existing codes reused, fp tokens encoded."""
        parts = []
        for seg, offset in self.offsets():
            if not seg.length:
                continue
            if seg is self.main:
                parts.append(seg.views())
            else:
                sl = slice(offset, offset + seg.length)
                parts.append(self.main.encode(k_all[:, :, sl], v_all[:, :, sl]))
        return {name: torch.cat([p[name] for p in parts], dim=2) for name in parts[0]}

    def evict_main(self, idx_main: torch.Tensor) -> None:
        """Decode-time eviction inside the quantized (or only) segment: keep tokens idx_main (B, H, K) of it."""
        self.main.store.compact(idx_main)

    def index_batch(self, rows: torch.Tensor) -> None:
        for seg in self.segments:
            if seg.length:
                seg.store.index_batch(rows)

    def nbytes(self) -> int:
        return sum(seg.store.nbytes() for seg in self.segments)

    def tensors(self) -> list[torch.Tensor]:
        return [t for seg in self.segments for t in seg.store.tensors()]

    def clear(self) -> None:
        for seg in self.segments:
            seg.store.clear()


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    index = idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return torch.gather(t, 2, index.to(t.device))


class SharedPrefix:
    """Read-only pages of a shared prompt prefix (from a PrefixCache pool), attended in place through a block table.

    Row b sees prefix tokens [starts[b], ends[b]) of its pages, encoded as `fields` say (full precision "k"/"v", or
    codes + scales + zeros with `bits`/`groups`); the pages stay owned by the PrefixCache (locked while in use), so
    every request reading them shares one physical copy.
    """

    def __init__(self, fields: dict[str, torch.Tensor], block_table: torch.Tensor, starts: torch.Tensor,
                 ends: torch.Tensor, bits: tuple[int, int] = (16, 16),
                 groups: tuple[int | None, int | None] = (None, None)) -> None:
        self.fields, self.bits, self.groups = fields, bits, groups
        self.block_table, self.starts, self.ends = (t.to(torch.int32) for t in (block_table, starts, ends))

    def store_args(self) -> tuple:
        """The shared pages as one store of decode_attention_multi (rows read [starts, ends) of their pages)."""
        f = self.fields
        return (f["k"], f["v"], f.get("k_scale"), f.get("k_zero"), f.get("v_scale"), f.get("v_zero"), self.block_table,
                self.starts, self.ends, *self.bits, *self.groups)

    def attend(self, q: torch.Tensor, sm_scale: float):
        store = self.store_args()
        args = (*store[:9], sm_scale, *store[9:])  # the kernels take sm_scale between the bounds and the bits
        if q.shape[2] == 1:
            out, lse = decode_attention(q[:, :, 0], *args)
            return out[:, :, None], lse[:, :, None]
        return extend_attention(q, *args)

    def index_batch(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.block_table.device)
        self.block_table, self.starts, self.ends = (t.index_select(0, rows) for t in
                                                    (self.block_table, self.starts, self.ends))

    def tensors(self) -> list[torch.Tensor]:
        """Per-request bookkeeping only: the pages belong to the PrefixCache."""
        return [self.block_table, self.starts, self.ends]
