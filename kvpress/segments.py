"""A layer's stored tokens as runs ("segments") that are contiguous in logical order, each with one encoding.

Unquantized layers have one fp segment. Quantized layers have three: the first `n_sink` tokens in full precision,
the quantized middle, and a full-precision window of the most recent tokens that is flushed to the middle in blocks.
Attention is order-free, so the segments are attended as separate stores whose partial results merge exactly (at decode,
all of them in one fused kernel: decode_attention_multi); presses see the concatenation in logical order.
"""
from __future__ import annotations

import torch

from .kernels import KVStore
from .paged.contiguous import ContiguousStore
from .paged.ragged import RaggedStore
from .quant.codec_base import KVCodec
from .quant.full_precision import FullPrecisionCodec

_SIXTEEN_BIT = torch.float16
FLUSH_BLOCK = 16  # window tokens quantized together once the window holds residual + FLUSH_BLOCK tokens


class Segment:
    """One run of tokens: a contiguous store plus the codec its tokens are encoded with (default: as they come)."""

    def __init__(self, codec: KVCodec | None = None, max_tokens: int | None = None):
        self.store = ContiguousStore(max_tokens)
        self.codec = codec if codec is not None else FullPrecisionCodec()
        self._start_cache: tuple | None = None  # (layer kv_start, its version, offset, kv_start - offset)

    @property
    def quantized(self) -> bool:
        """Whether the codec stores codes (the kernels then dequantize its tiles)."""
        return self.codec.quantized

    @property
    def k_bits(self) -> int:
        """Bits of the stored keys (16 = unquantized), from the codec: the kernels' tile loads read it."""
        return self.codec.k_bits

    @property
    def v_bits(self) -> int:
        """Bits of the stored values (16 = unquantized), from the codec."""
        return self.codec.v_bits

    @property
    def k_group(self) -> int | None:
        """Head-dim elements per key (scale, zero) pair (None = one group of head_dim), from the codec."""
        return self.codec.k_group

    @property
    def v_group(self) -> int | None:
        """Head-dim elements per value (scale, zero) pair (None = one group of head_dim), from the codec."""
        return self.codec.v_group

    @property
    def length(self) -> int:
        return self.store.length

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode tokens (B, H, N, D) into this segment's fields (the codec's)."""
        return self.codec.encode(k, v)

    def decode(self, fields: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype):
        """Full-precision (K, V) of encoded fields (the codec's)."""
        return self.codec.decode(fields, head_dim, dtype)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode and store tokens at the end; after the first write, tokens are written in place into spare
        capacity (quantized ones by the quantize-and-store kernel, Triton on CUDA), so no encoded copy is made."""
        store = self.store
        if not store.fields:  # first write: exact-size allocation
            store.append(self.codec.encode(k, v))
            return
        if self.codec.passthrough:  # writing into the existing fields casts (no separate conversion op)
            store.append({"k": k, "v": v})
            return
        n = k.shape[2]
        store.reserve(n)
        dst = torch.full((k.shape[0],), store.length, dtype=torch.int32, device=k.device)
        self.codec.store(k, v, store.fields, store.block_table(), dst)
        store.advance(n)

    def views(self) -> dict[str, torch.Tensor]:
        return {name: self.store.view(name) for name in self.store.fields}

    def kernel_store(self, kv_start: torch.Tensor | None, offset: int) -> KVStore:
        """This segment as one KVStore of the multi-store kernels, given the layer-wide padding start.

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
        f = self.store.fields
        width = f["v"].shape[-1]
        k_rotation, v_rotation = self.codec.rotations(width if self.v_bits == 16 else width * 8 // self.v_bits,
                                                      f["v"].device)
        return KVStore(k=f["k"], v=f["v"], block_table=self.store.block_table(), kv_start=start, kv_end=self.length,
                       k_bits=self.k_bits, v_bits=self.v_bits, k_scale=f.get("k_scale"), k_zero=f.get("k_zero"),
                       v_scale=f.get("v_scale"), v_zero=f.get("v_zero"), k_group=self.k_group,
                       v_group=self.v_group, k_rotation=k_rotation, v_rotation=v_rotation,
                       k_block=self.codec.k_block)  # fmt: skip


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
            self.sink = Segment(FullPrecisionCodec(_SIXTEEN_BIT), max_tokens=quant.n_sink)
            self.main = Segment(quant.build_codec())
            self.window = Segment(FullPrecisionCodec(_SIXTEEN_BIT), max_tokens=quant.residual + self.flush_block)
        # fp sink slots: n_sink plus the batch's largest left padding (or leading filler slots after a press), so
        # that every row's first n_sink real tokens stay full precision, as in its batch-1 run
        self.n_sink = quant.n_sink if quant is not None else 0
        self.pressed: PressedHeads | None = None  # a per-head compression's tokens (before every segment), or None

    @property
    def flush_block(self) -> int:
        """Tokens the window hands to the middle at a time while decoding: FLUSH_BLOCK, or the codec's block of
        per-channel keys when larger (the middle is written in whole blocks)."""
        return max(FLUSH_BLOCK, self.main.codec.token_block)

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
        if self.pressed is None and not self.main.length and not self.window.length:  # sinks may still grow
            self._set_sink_slots(max(self.n_sink, self.quant.n_sink + max_pad))
        n_sink = max(0, min(self.n_sink - self.sink.length, k.shape[2]))
        if n_sink:
            self.sink.append(k[:, :, :n_sink], v[:, :, :n_sink])
            k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        n = k.shape[2]
        if not n:
            return
        # Decode lets the window overshoot by one block so flushes (and their quantize calls) come in blocks.
        unit = self.main.codec.token_block  # the middle takes whole blocks of per-channel keys (else any count)
        limit = self.quant.residual + (self.flush_block if n == 1 else 0)
        excess = self.window.length + n - self.quant.residual
        excess -= excess % unit  # the rest waits in the window (at most residual + unit - 1 tokens)
        if self.window.length + n > limit and excess > 0:
            from_window = min(excess, self.window.length)
            from_chunk = excess - from_window  # chunk tokens already too old for the window go straight to the middle
            moved = []
            if from_window:
                moved.append((self.window.store.view("k")[:, :, :from_window],
                              self.window.store.view("v")[:, :, :from_window]))
            if from_chunk:
                moved.append((k[:, :, :from_chunk], v[:, :, :from_chunk]))
                k, v = k[:, :, from_chunk:], v[:, :, from_chunk:]
            if unit > 1 and len(moved) == 2:  # one write, so that every block is encoded whole
                moved = [(torch.cat((moved[0][0], moved[1][0].to(moved[0][0].dtype)), dim=2),
                          torch.cat((moved[0][1], moved[1][1].to(moved[0][1].dtype)), dim=2))]
            for old_k, old_v in moved:
                self.main.append(old_k, old_v)
            if from_window:
                self.window.store.drop_front(from_window)
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
        Per-channel keys (a codec with token_block > 1) re-encode the kept middle from k_all / v_all in new blocks,
        and the window keeps the tokens short of a whole block.
        """
        if self.quant is None:
            self.main.store.keep(idx)
            return
        n_keep = idx.shape[2]
        self._set_sink_slots(self.quant.n_sink + n_masked)
        n_sink = min(self.n_sink, n_keep)
        unit = self.main.codec.token_block
        n_main = (n_keep - n_sink - min(self.quant.residual, n_keep - n_sink)) // unit * unit  # whole blocks
        n_window = n_keep - n_sink - n_main
        if n_main:
            main_idx = idx[:, :, n_sink : n_sink + n_main]
            if unit > 1:  # per-channel keys: the kept tokens form new blocks, encoded from full precision
                fields = self.main.encode(_gather(k_all, main_idx), _gather(v_all, main_idx))
            else:
                candidates = self._quantized_candidates(k_all, v_all)
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

    def keep_per_head(self, keep: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """Keep tokens keep (B, H, T) bool of the logical order, a different number per (row, head): they move to
        `pressed` (each head at its own length: the bytes follow the tokens kept) and every segment empties; later
        tokens are appended to the segments as usual. Quantized layers keep the same precision split as `keep`: each
        head's first n_sink and last `residual` kept tokens in fp, the rest as codes (existing codes reused)."""
        if self.quant is None:
            self.pressed = PressedHeads(RaggedStore.build({"k": k_all, "v": v_all}, keep))
        else:
            rank = torch.cumsum(keep.to(torch.int32), dim=2) - 1
            count = rank[:, :, -1:] + 1
            in_fp = keep & ((rank < self.quant.n_sink) | (rank >= count - self.quant.residual))
            fp = self.sink.codec
            self.pressed = PressedHeads(RaggedStore.build(fp.encode(k_all, v_all), in_fp),
                                        RaggedStore.build(self._quantized_candidates(k_all, v_all), keep & ~in_fp),
                                        self.main.codec)
            self._set_sink_slots(0)  # the sinks are in `pressed`
        for seg in self.segments:
            seg.store.clear()

    def evict_main(self, idx_main: torch.Tensor) -> None:
        """Decode-time eviction inside the quantized (or only) segment: keep tokens idx_main (B, H, K) of it."""
        self.main.store.compact(idx_main)

    def index_batch(self, rows: torch.Tensor) -> None:
        for seg in self.segments:
            if seg.length:
                seg.store.index_batch(rows)
        if self.pressed is not None:
            self.pressed = self.pressed.index_batch(rows)

    def tensors(self) -> list[torch.Tensor]:
        pressed = self.pressed.tensors() if self.pressed is not None else []
        return [t for seg in self.segments for t in seg.store.tensors()] + pressed

    def clear(self) -> None:
        for seg in self.segments:
            seg.store.clear()
        self.pressed = None


class PressedHeads:
    """What a per-head compression kept: fp tokens and (quantized layers) the codes of the rest, each a RaggedStore
    with its own length per (row, kv head). Read-only; attended as stores with one kv head per row."""

    def __init__(self, fp: RaggedStore, codes: RaggedStore | None = None, codec: KVCodec | None = None) -> None:
        self.fp, self.codes, self.codec = fp, codes, codec

    @property
    def heads(self) -> int:
        return self.fp.heads

    def mean_tokens(self) -> float:
        """Tokens held per (row, head), averaged."""
        total = self.fp.total_tokens + (self.codes.total_tokens if self.codes is not None else 0)
        return total / self.fp.lengths.shape[0]

    def kernel_stores(self) -> list[KVStore]:
        """The non-empty parts as KVStores of one kv head per (row, head) row (kernels/head_rows.py)."""
        stores = []
        if self.fp.total_tokens:
            f = self.fp.fields
            stores.append(KVStore(k=f["k"], v=f["v"], block_table=self.fp.block_table, kv_end=self.fp.lengths))
        if self.codes is not None and self.codes.total_tokens:
            f, codec = self.codes.fields, self.codec
            k_rotation, v_rotation = codec.rotations(_head_dim(f["k"], codec.k_bits), f["k"].device)
            stores.append(KVStore(k=f["k"], v=f["v"], block_table=self.codes.block_table, kv_end=self.codes.lengths,
                                  k_bits=codec.k_bits, v_bits=codec.v_bits, k_scale=f.get("k_scale"),
                                  k_zero=f.get("k_zero"), v_scale=f.get("v_scale"), v_zero=f.get("v_zero"),
                                  k_group=codec.k_group, v_group=codec.v_group, k_rotation=k_rotation,
                                  v_rotation=v_rotation, k_block=codec.k_block))
        return stores

    def index_batch(self, rows: torch.Tensor) -> PressedHeads:
        codes = self.codes.index_batch(rows) if self.codes is not None else None
        return PressedHeads(self.fp.index_batch(rows), codes, self.codec)

    def tensors(self) -> list[torch.Tensor]:
        return self.fp.tensors() + (self.codes.tensors() if self.codes is not None else [])


def _head_dim(codes: torch.Tensor, bits: int) -> int:
    """head_dim of a field of `bits`-bit codes (16: the field itself)."""
    return codes.shape[-1] if bits == 16 else codes.shape[-1] * 8 // bits


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    index = idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return torch.gather(t, 2, index.to(t.device))


class SharedPrefix:
    """Read-only pages of a shared prompt prefix (from a PrefixCache pool), attended in place through a block table.

    Row b sees prefix tokens [starts[b], ends[b]) of its pages, encoded as `fields` say (full precision "k"/"v", or
    codes + scales + zeros with `bits`/`groups`, of tokens stored rotated by `rotations` (the codec's (Rk, Rv)));
    the pages stay owned by the PrefixCache (locked while in use), so
    every request reading them shares one physical copy.
    """

    def __init__(self, fields: dict[str, torch.Tensor], block_table: torch.Tensor, starts: torch.Tensor,
                 ends: torch.Tensor, bits: tuple[int, int] = (16, 16),
                 groups: tuple[int | None, int | None] = (None, None),
                 rotations: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> None:
        self.fields, self.bits, self.groups, self.rotations = fields, bits, groups, rotations
        self.block_table, self.starts, self.ends = (t.to(torch.int32) for t in (block_table, starts, ends))

    def kernel_store(self) -> KVStore:
        """The shared pages as one KVStore of the multi-store kernels (rows read [starts, ends) of their pages)."""
        f = self.fields
        (k_bits, v_bits), (k_group, v_group) = self.bits, self.groups
        return KVStore(k=f["k"], v=f["v"], block_table=self.block_table, kv_start=self.starts, kv_end=self.ends,
                       k_bits=k_bits, v_bits=v_bits, k_scale=f.get("k_scale"), k_zero=f.get("k_zero"),
                       v_scale=f.get("v_scale"), v_zero=f.get("v_zero"), k_group=k_group, v_group=v_group,
                       k_rotation=self.rotations[0], v_rotation=self.rotations[1])

    def index_batch(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.block_table.device)
        self.block_table, self.starts, self.ends = (t.index_select(0, rows) for t in
                                                    (self.block_table, self.starts, self.ends))

    def tensors(self) -> list[torch.Tensor]:
        """Per-request bookkeeping only: the pages belong to the PrefixCache."""
        return [self.block_table, self.starts, self.ends]
