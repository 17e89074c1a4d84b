"""PrefixCache: KV of already-seen prompt prefixes kept across generate calls, so a repeated prefix is not recomputed.

It owns a RadixTree (which prefixes are stored) and a BlockPool (their KV pages), the pool created on the first
`store`, when the model's layer count, kv-heads, fields and dtypes are known. Pages hold whole model layers, so one
PrefixCache serves one model + storage layout; namespaces separate settings that share a layout but not their KV
(press, quantization parameters, model revision...).

Reference discipline: the tree holds one reference per stored page; a live `PrefixHit` (from `match`) holds one
more on each of its pages and locks its node, so `stats()["pages_shared"]` counts pages used by live requests.
When no `store` is running, a page's refcount is exactly (1 if in the tree) + (live hits holding it).

Threads: one PrefixCache may be shared by threads that generate concurrently. Its RadixTree and BlockPool are not
thread-safe on their own; every PrefixCache method that reads or changes them (match, release, gather, store,
stats, check_invariants) holds the cache's one re-entrant lock for its whole duration. Readers of page contents
outside these methods (kernels reading a live hit's pages in place) need no lock: a locked hit's pages are never
evicted or rewritten, and `store` writes only pages it has just allocated.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvpress.paged.pool import DEFAULT_PAGE_SIZE, BlockPool, FieldSpec
from kvpress.paged.radix import RadixNode, RadixTree

TokenIds = Sequence[int] | torch.Tensor
LayerFields = Mapping[str, torch.Tensor]  # field name -> (H_kv, n_tokens, X)


@dataclass(eq=False)
class PrefixHit:
    """A locked match: the first `n_tokens` of the query are stored in `pages`; give it back with `release`."""

    n_tokens: int
    pages: list[int]
    namespace: str
    node: RadixNode | None = field(default=None, repr=False)
    released: bool = False


class PrefixCache:
    """Stores page-aligned KV of prompt prefixes under a token budget and hands matching prefixes back."""

    def __init__(self, max_tokens: int, page_size: int = DEFAULT_PAGE_SIZE, quant: object = None) -> None:
        """`quant` (a QuantSpec or its string, e.g. "int8-int4"): also keep every stored token's codes for that
        encoding beside its full-precision KV, so requests quantized the same way read their shared prefix's codes
        in place instead of holding a copy (kvpress/prefix.py computes the codes; this class stores any fields)."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"PrefixCache page_size must be an int >= 1, got {page_size!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < page_size:
            raise ValueError(
                f"PrefixCache max_tokens must be an int >= page_size ({page_size}) to hold one page, got {max_tokens!r}"
            )
        self.max_tokens = max_tokens
        self.page_size = page_size
        self.quant = quant
        self.num_pages = max_tokens // page_size
        self.pool: BlockPool | None = None
        self.tree: RadixTree | None = None
        self._live_hits = 0
        self._hit_refs: Counter[int] = Counter()  # references held by live hits, per page
        self._queried_tokens = 0
        self._matched_tokens = 0
        self._lock = threading.RLock()  # guards tree, pool and the counters above (see the module docstring)

    # ------------------------------------------------------------------------------------------ lookups
    def match(self, namespace: str, token_ids: TokenIds, limit: int | None = None) -> PrefixHit:
        """Longest stored page-aligned prefix of `token_ids` (at most `limit` tokens, e.g. len - 1 to keep one
        token to compute), locked against eviction and referenced until `release(hit)`."""
        tokens = _as_tokens(token_ids)
        if limit is not None:
            if limit < 0:
                raise ValueError(f"PrefixCache.match limit must be >= 0, got {limit}")
            tokens = tokens[:limit]
        with self._lock:
            return self._match(namespace, tokens)

    def _match(self, namespace: str, tokens: tuple[int, ...]) -> PrefixHit:
        self._queried_tokens += len(tokens)
        if self.tree is None:
            return PrefixHit(0, [], namespace)
        n, pages, node = self.tree.match_prefix(tokens, namespace)
        self.tree.lock(node)
        self.pool.incref(pages)
        self._hit_refs.update(pages)
        self._live_hits += 1
        self._matched_tokens += n
        return PrefixHit(n, pages, namespace, node)

    def release(self, hit: PrefixHit) -> None:
        """Unlock and drop the references of a hit from `match` (exactly once)."""
        with self._lock:
            self._release(hit)

    def _release(self, hit: PrefixHit) -> None:
        if hit.released:
            raise RuntimeError("PrefixCache.release called twice for the same PrefixHit")
        hit.released = True
        if hit.node is None:
            return
        self.tree.unlock(hit.node)
        self.pool.decref(hit.pages)
        self._hit_refs.subtract(hit.pages)
        self._live_hits -= 1

    def gather(self, hit: PrefixHit, layer: int) -> dict[str, torch.Tensor]:
        """The hit's tokens of one layer as contiguous (H_kv, n_tokens, X) tensors per field (n_tokens may be 0)."""
        with self._lock:
            if hit.released:
                raise RuntimeError("PrefixCache.gather of a released PrefixHit: its pages may already be reused")
            if self.pool is None:
                raise RuntimeError("PrefixCache.gather before anything was stored: the field layout is not known yet")
            return self.pool.gather(layer, hit.pages, hit.n_tokens)

    # ------------------------------------------------------------------------------------------ storing
    def store(self, namespace: str, token_ids: TokenIds, layers: Sequence[LayerFields]) -> int:
        """Keep the KV of `token_ids` (per layer: field -> (H_kv, n, X), n = len(token_ids)) for later matches.

        Only whole pages are kept (the last len % page_size tokens are not). Pages already stored are not
        written again; least recently used unlocked prefixes are evicted to make room. Returns the number of
        newly stored tokens. Raises (nothing changed) if locked prefixes leave too little room.
        """
        tokens = _as_tokens(token_ids)
        with self._lock:
            return self._store(namespace, tokens, layers)

    def _store(self, namespace: str, tokens: tuple[int, ...], layers: Sequence[LayerFields]) -> int:
        self._check_layers(layers, len(tokens))
        n_full = len(tokens) // self.page_size * self.page_size
        if n_full == 0:
            return 0
        tokens = tokens[:n_full]
        self._ensure_pool(layers)
        n_have, have_pages, node = self.tree.match_prefix(tokens, namespace)
        need = n_full // self.page_size - len(have_pages)
        if need == 0:
            return 0
        self.tree.lock(node)  # the matched prefix must survive the eviction below
        try:
            short = need - self.pool.pages_free
            if short > 0:
                evictable = self.tree.evictable_pages()
                if evictable < short:
                    raise RuntimeError(
                        f"PrefixCache full: storing {need * self.page_size} new tokens needs {need} pages of "
                        f"{self.page_size}, {self.pool.pages_free} are free and {evictable} evictable (the rest is "
                        f"locked by {self._live_hits} live matches); raise max_tokens (now {self.max_tokens}) or "
                        "release matches first"
                    )
                self.tree.evict(short)
            new_pages = self.pool.alloc(need)  # raises (state unchanged) if pages are held outside the cache
            try:
                for i, fields in enumerate(layers):
                    self.pool.write_tokens(i, {k: v[:, n_have:n_full] for k, v in fields.items()}, new_pages)
                self.tree.insert(tokens, have_pages + new_pages, namespace)
            finally:
                self.pool.decref(new_pages)  # the tree took its own reference (or none if insert failed)
        finally:
            self.tree.unlock(node)
        return need * self.page_size

    # ------------------------------------------------------------------------------------------- report
    def stats(self) -> dict[str, int]:
        """Pages total/used/free/shared (refcount > 1: also held by live matches), tokens cached, bytes, hits."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, int]:
        pool = self.pool
        return {
            "page_size": self.page_size,
            "pages_total": self.num_pages,
            "pages_used": pool.pages_used if pool is not None else 0,
            "pages_free": pool.pages_free if pool is not None else self.num_pages,
            "pages_shared": pool.pages_shared if pool is not None else 0,
            "tokens_cached": self.tree.total_pages * self.page_size if self.tree is not None else 0,
            "live_matches": self._live_hits,
            "queried_tokens": self._queried_tokens,
            "matched_tokens": self._matched_tokens,
            "nbytes": pool.nbytes() if pool is not None else 0,
            "quant": None if self.quant is None else str(self.quant),
        }

    def check_invariants(self) -> None:
        """Pool and tree invariants, and refcount(p) == (1 if p is in the tree) + live hits holding p, every page."""
        with self._lock:
            self._check_invariants()

    def _check_invariants(self) -> None:
        if self.pool is None:
            return
        self.pool.check_invariants()
        self.tree.check_invariants()
        held = self.tree.held_pages()
        for p in range(self.pool.num_pages):
            want = (p in held) + self._hit_refs[p]
            if self.pool.refcount(p) != want:
                raise RuntimeError(
                    f"PrefixCache invariant broken: page {p} has refcount {self.pool.refcount(p)}, owners say {want}"
                )

    # ------------------------------------------------------------------------------------------ helpers
    def _check_layers(self, layers: Sequence[LayerFields], n_tokens: int) -> None:
        if not layers:
            raise ValueError("PrefixCache.store needs at least one layer of fields")
        for i, fields in enumerate(layers):
            if not fields:
                raise ValueError(f"PrefixCache.store layer {i} has no fields")
            heads = next(iter(fields.values())).shape[0]
            for name, value in fields.items():
                if value.dim() != 3 or value.shape[1] != n_tokens or value.shape[0] != heads:
                    raise ValueError(
                        f"PrefixCache.store layer {i} field {name!r}: expected ({heads}, {n_tokens}, X) (kv-heads, "
                        f"one per token id, width), got {tuple(value.shape)}"
                    )
        if self.pool is not None:
            got = _layout(layers)
            want = (self.pool.num_layers, self.pool.num_kv_heads, self.pool.field_specs)
            if got[:3] != want:
                raise ValueError(
                    f"PrefixCache.store layout (layers, kv-heads, fields) {got[:3]} != the cache's {want}: one "
                    "PrefixCache holds one model/storage layout; use another PrefixCache for this one"
                )
        else:
            layout = _layout(layers)
            if any(_layout([f])[1:3] != layout[1:3] for f in layers):
                raise ValueError("PrefixCache.store needs the same kv-heads and fields (width, dtype) in every layer")

    def _ensure_pool(self, layers: Sequence[LayerFields]) -> None:
        if self.pool is not None:
            return
        num_layers, heads, specs, device = _layout(layers)
        self.pool = BlockPool(self.num_pages, num_layers, heads, specs, self.page_size, device)
        self.tree = RadixTree(self.pool, self.page_size)


def _as_tokens(token_ids: TokenIds) -> tuple[int, ...]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"PrefixCache token ids must be 1-D (one sequence), got shape {tuple(token_ids.shape)}")
        return tuple(token_ids.tolist())
    return tuple(int(t) for t in token_ids)


def _layout(layers: Sequence[LayerFields]) -> tuple[int, int, dict[str, FieldSpec], torch.device]:
    first = layers[0]
    value = next(iter(first.values()))
    specs = {name: (int(v.shape[-1]), v.dtype) for name, v in first.items()}
    return len(layers), int(value.shape[0]), specs, value.device
