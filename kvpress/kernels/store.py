"""KVStore: everything an attention kernel reads of one store (docs/STORAGE_LAYOUT.md), as named fields, and the
checks of a store against a query. Segments, shared prefixes and `chunk_store` build them; every kernel and its
torch twin read them by field name."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.kernels.affine import check_token_block


@dataclass(frozen=True, eq=False, kw_only=True, slots=True)
class KVStore:
    """One store: pages k / v (P, Hkv, S, X) read through `block_table` (B, max_pages) int32; row b attends tokens
    [kv_start, kv_end) ((B,) int tensors, or one int for every row; a start is clamped into [0, kv_end]). Quantized
    fields (bits 2 / 4 / 8) carry fp16 scale / zero (P, Hkv, S, D / group); 16-bit fields have none. `causal`: a
    prefill chunk over itself (its tokens 0..Q-1): query i sees tokens j <= i only. `k_rotation` / `v_rotation`:
    the tokens were stored rotated (x @ R): the twins rotate q and the output per store, the Triton entry points
    per group of stores (kernels/rotation.py). `k_block` G: keys quantized per channel over blocks of G tokens
    (KIVI), scales in slot layout (kernels/affine.quantize_channels; k_scale (P, Hkv, S, D / G), k_group unused);
    such a store is contiguous (one page per row) and holds whole blocks."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    kv_end: torch.Tensor | int
    kv_start: torch.Tensor | int = 0
    k_bits: int = 16
    v_bits: int = 16
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    k_group: int | None = None
    v_group: int | None = None
    causal: bool = False
    k_rotation: torch.Tensor | None = None  # stored keys are k @ k_rotation (D, D) orthogonal (kernels/rotation.py)
    v_rotation: torch.Tensor | None = None  # stored values are v @ v_rotation
    k_block: int | None = None  # keys per channel over blocks of k_block tokens (None: per token)

    @property
    def page_size(self) -> int:
        """Token slots per page (S)."""
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        """Tokens a row can address: max_pages * page_size."""
        return self.block_table.shape[1] * self.k.shape[2]

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The stored tensors (k, v, k_scale, k_zero, v_scale, v_zero, block_table): what a launch plan is keyed
        by (the bounds change per call)."""
        return self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero, self.block_table

    def encoding(self) -> tuple[int, int, int | None, int | None, bool, int | None]:
        """(k_bits, v_bits, k_group, v_group, causal, k_block): the compile-time part of the store besides its
        shapes."""
        return self.k_bits, self.v_bits, self.k_group, self.v_group, self.causal, self.k_block


def chunk_store(k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None) -> KVStore:
    """A prefill chunk's own tokens k, v (B, Hkv, Q, D) as one causal 16-bit store (one page per row, pages = rows;
    rows' tokens [kv_start, Q), left padding before kv_start; None: no padding)."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"chunk k and v must both be (B, Hkv, Q, D); got {tuple(k.shape)}, {tuple(v.shape)}")
    batch, _, length, _ = k.shape
    table = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None]
    start = 0 if kv_start is None else kv_start.to(torch.int32)
    return KVStore(k=k, v=v, block_table=table, kv_start=start, kv_end=length, causal=True)


@dataclass(frozen=True)
class StoreGeometry:
    """Sizes shared by a query tensor and one KV store, resolved and checked once per call."""

    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    head_dim: int
    page_size: int
    k_group: int
    v_group: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.q_heads // self.kv_heads


def _check_field(name: str, field: torch.Tensor, bits: int, head_dim: int) -> None:
    """Check dtype and last-dim width of one stored field (k or v) for its bit width."""
    if field.dim() != 4:
        raise ValueError(f"{name} must have shape (P, Hkv, S, X); got shape {tuple(field.shape)}")
    if bits == 16:
        if not field.is_floating_point():
            raise ValueError(f"{name} with {name}_bits=16 must be a floating tensor; got {field.dtype}")
        width = head_dim
    elif bits in (2, 4, 8):
        if field.dtype != torch.uint8:
            raise ValueError(f"{name} with {name}_bits={bits} must be uint8 codes; got {field.dtype}")
        width = head_dim * bits // 8
    else:
        raise ValueError(f"{name}_bits must be 2, 4, 8 or 16; got {bits}")
    if field.shape[-1] != width:
        raise ValueError(
            f"{name} last dim must be {width} for {bits}-bit codes of head_dim {head_dim}; got {field.shape[-1]}"
        )


def _resolve_group(
    name: str, field: torch.Tensor, scale, zero, bits: int, group: int | None, head_dim: int,
    per_channel: bool = False,
) -> int:
    """Check the scale/zero fields of a quantized field and return its group size (head_dim when unquantized;
    `per_channel`: the block of per-channel keys, whose D / G scale columns per slot need not split the halves)."""
    if bits == 16:
        if scale is not None or zero is not None:
            raise ValueError(f"{name}_scale and {name}_zero must be None when {name}_bits=16")
        return head_dim
    if scale is None or zero is None:
        raise ValueError(f"{name}_scale and {name}_zero are required when {name}_bits={bits}")
    expected = tuple(field.shape[:3])
    for label, t in ((f"{name}_scale", scale), (f"{name}_zero", zero)):
        if t.dim() != 4 or tuple(t.shape[:3]) != expected or not t.is_floating_point():
            raise ValueError(
                f"{label} must be a floating tensor shaped (P, Hkv, S, G) with (P, Hkv, S) = {expected}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if scale.shape != zero.shape or scale.stride() != zero.stride():
        raise ValueError(f"{name}_scale and {name}_zero must have the same shape and strides")
    n_groups = scale.shape[-1]
    if n_groups == 0 or head_dim % n_groups != 0:
        raise ValueError(f"{name}_scale has {n_groups} groups, which does not divide head_dim {head_dim}")
    resolved = head_dim // n_groups
    if group is not None and group != resolved:
        raise ValueError(f"{name}_group={group} disagrees with {name}_scale width {n_groups} (head_dim {head_dim})")
    if bits < 8 and not per_channel and resolved != head_dim and (head_dim // 2) % resolved != 0:
        raise ValueError(
            f"{name}_group={resolved} must divide head_dim/2={head_dim // 2} or equal head_dim for {bits}-bit codes"
        )
    return resolved


def _check_channel_block(store: KVStore, head_dim: int) -> None:
    """Per-channel keys: quantized, a power-of-two block dividing head_dim (affine.check_token_block), one page per
    row."""
    if store.k_bits == 16:
        raise ValueError(f"k_block={store.k_block!r} needs quantized keys; got k_bits=16")
    check_token_block(head_dim, store.k_block)
    if store.block_table.dim() != 2 or store.block_table.shape[1] != 1:
        raise ValueError("a store of per-channel keys (k_block) must be contiguous: one page per row")


def check_bounds(store: KVStore, batch: int, device: torch.device, label: str = "store") -> None:
    """A store's row bounds: ints >= 0, or int32/int64 (B,) tensors on the query's device."""
    for name, t in (("kv_start", store.kv_start), ("kv_end", store.kv_end)):
        if isinstance(t, torch.Tensor):
            if t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (batch,) or t.device != device:
                raise ValueError(
                    f"{label} {name} must be an int32/int64 ({batch},) tensor on {device}; "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        elif isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{label} {name} must be an int >= 0 or a (B,) tensor; got {t!r}")


def check_store(q: torch.Tensor, store: KVStore, label: str = "store") -> StoreGeometry:
    """Check q (B, Hq, Q, D) against the store's fields and row bounds; raise ValueError naming the problem.

    Values of block_table / kv_start / kv_end are not read here (that would synchronise a GPU); the torch twins
    check them, the Triton kernels trust them."""
    if not isinstance(store, KVStore):
        raise ValueError(f"{label} must be a KVStore; got {type(store).__name__}")
    if q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a floating tensor shaped (B, Hq, Q, D); got {q.dtype} {tuple(q.shape)}")
    batch, q_heads, num_queries, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    k, v = store.k, store.v
    _check_field("k", k, store.k_bits, head_dim)
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    k_group = _resolve_group("k", k, store.k_scale, store.k_zero, store.k_bits,
                             store.k_group if store.k_block is None else store.k_block, head_dim,
                             per_channel=store.k_block is not None)
    if store.k_block is not None:
        _check_channel_block(store, head_dim)
    _check_field("v", v, store.v_bits, head_dim)
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"k and v must share (P, Hkv, S); got {tuple(k.shape)} and {tuple(v.shape)}")
    v_group = _resolve_group("v", v, store.v_scale, store.v_zero, store.v_bits, store.v_group, head_dim)
    table = store.block_table
    if table.dim() != 2 or table.shape[0] != batch or table.shape[1] == 0:
        raise ValueError(f"block_table must be shaped (B={batch}, max_pages>=1); got {tuple(table.shape)}")
    if table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64; got {table.dtype}")
    if table.device != q.device or k.device != q.device:
        raise ValueError(f"block_table, q and the store must be on one device; got {table.device}, {q.device}, "
                         f"{k.device}")  # fmt: skip
    check_bounds(store, batch, q.device, label)
    if not isinstance(store.causal, bool):
        raise ValueError(f"{label} causal must be a bool; got {store.causal!r}")
    for name in ("k_rotation", "v_rotation"):
        matrix = getattr(store, name)
        if matrix is not None and (tuple(matrix.shape) != (head_dim, head_dim) or matrix.dtype != torch.float32
                                   or matrix.device != q.device):
            raise ValueError(f"{label} {name} must be a float32 ({head_dim}, {head_dim}) matrix on {q.device}; got "
                             f"{matrix.dtype} {tuple(matrix.shape)} on {matrix.device}")
    return StoreGeometry(batch, q_heads, kv_heads, num_queries, head_dim, k.shape[2], k_group, v_group)


def row_bounds(store: KVStore, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32 tensors of a store's bounds: ints broadcast to every row, starts clamped into [0, end]."""
    start, end = store.kv_start, store.kv_end
    end = end if isinstance(end, torch.Tensor) else torch.full((batch,), end, device=device)
    start = start if isinstance(start, torch.Tensor) else torch.full((batch,), start, device=device)
    end = end.to(torch.int32)
    return torch.minimum(start.to(torch.int32).clamp(min=0), end), end


MAX_STORES = 5  # sinks, quantized middle, window, shared prefix (+ the new chunk itself when extending)


def check_stores(q: torch.Tensor, stores: tuple[KVStore, ...]) -> list[StoreGeometry]:
    """Check q (B, Hq, D) (decode) or (B, Hq, Q, D) and 1..MAX_STORES stores sharing its heads and head dim;
    return each store's geometry."""
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be shaped (B, Hq, D) (decode) or (B, Hq, Q, D); got {tuple(q.shape)}")
    if not isinstance(stores, (tuple, list)) or not 1 <= len(stores) <= MAX_STORES:
        count = len(stores) if isinstance(stores, (tuple, list)) else type(stores).__name__
        raise ValueError(f"multi-store attention takes 1 to {MAX_STORES} stores; got {count}")
    q4 = q if q.dim() == 4 else q.unsqueeze(2)
    return [check_store(q4, store, f"store {i}") for i, store in enumerate(stores)]


def check_score_args(
    q: torch.Tensor, stores: tuple[KVStore, ...], scores: torch.Tensor | None, score_offsets
) -> None:
    """The optional logits output: float32 (B, Hq, L) with unit stride over L, and one int offset >= 0 per store
    (store token t lands at column offset + t; columns no row attends are left untouched)."""
    if scores is None:
        if score_offsets is not None:
            raise ValueError("score_offsets given without a scores tensor to write")
        return
    if scores.dtype != torch.float32 or scores.dim() != 3 or tuple(scores.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(
            f"scores must be float32 shaped (B, Hq, L) with (B, Hq) = {tuple(q.shape[:2])}; "
            f"got {scores.dtype} {tuple(scores.shape)}"
        )
    if scores.shape[2] > 1 and scores.stride(2) != 1:
        raise ValueError("scores must have unit stride along its last (token) dimension")
    if score_offsets is None or len(score_offsets) != len(stores) or any(
        not isinstance(o, int) or o < 0 for o in score_offsets
    ):
        raise ValueError(f"score_offsets needs one int >= 0 per store ({len(stores)}); got {score_offsets}")


def check_decode_query(q: torch.Tensor) -> None:
    """Decode takes one query per row and head: q must be (B, Hq, D)."""
    if q.dim() != 3:
        raise ValueError(f"decode q must be shaped (B, Hq, D); got {tuple(q.shape)} (extend: extend_attention_multi)")


def check_extend_query(q: torch.Tensor) -> None:
    """Extend takes a chunk of queries per row and head: q must be (B, Hq, Q, D)."""
    if q.dim() != 4:
        raise ValueError(f"q must be shaped (B, Hq, Q, D); got {tuple(q.shape)} (decode: decode_attention_multi)")
