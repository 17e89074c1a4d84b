"""BlockPool: fixed-size KV pages for every layer of a model, with a free list and reference counts.

The pool is the `P` axis of docs/STORAGE_LAYOUT.md: per layer, one tensor per field shaped
`(num_pages, H_kv, page_size, X)`. Page ids are shared across layers (page p of every layer holds the same token
range), so one id, one refcount and one block-table entry cover a whole model. Owners (radix tree nodes, live
prefix matches, sequences) each hold one reference; a page returns to the free list when its count reaches 0.

Default page size (16), from a short measurement. Workload: 400 requests of log-uniform length 64..8192 tokens
(887k tokens), each starting with one of 8 shared prompts of 100..2000 tokens; each request matches
(limit = len - 1), stores, releases through a 1M-token PrefixCache. Waste is exact; times: H100, fp16, H=8, D=128,
one 4096-token sequence on shuffled pages (write_tokens / gather of one layer, k and v).

    page size                              8        16       32       64
    shared-prompt tokens not matched      0.3 %    0.8 %    1.6 %    3.1 %   (only whole pages are shared)
    last-page slack (paged sequences)     0.16 %   0.32 %   0.66 %   1.35 %  (of all tokens)
    pages (table entries) per 4k tokens   512      256      128      64
    write / gather 4k tokens, H100 (us)   195/138  128/93   100/73   86/61
    CPU tree + refcount work               ~equal: token-tuple handling dominates match (~0.5 ms per request)

Below 16, copies are ~1.5x slower and tables twice as long for < 1 % more sharing; above 16, the unshared tail of
every prefix and the slack double per step while copies get only ~20 % faster (decode kernels read pages in
place, so copies are off the per-token path anyway). 16 it is.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch

DEFAULT_PAGE_SIZE = 16

FieldSpec = tuple[int, torch.dtype]  # (width X, dtype) of one field per token and kv-head


class BlockPool:
    """Pages of every layer's KV fields plus the free list and refcounts that say who owns which page.

    Not thread-safe by itself: a PrefixCache shared by threads serialises every call under its lock."""

    def __init__(
        self,
        num_pages: int,
        num_layers: int,
        num_kv_heads: int,
        fields: Mapping[str, FieldSpec],
        page_size: int = DEFAULT_PAGE_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_pages", num_pages), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockPool {name} must be an int >= 1, got {value!r}")
        if not fields:
            raise ValueError("BlockPool needs at least one field spec, e.g. {'k': (128, torch.float16), 'v': ...}")
        for name, (width, dtype) in fields.items():
            if isinstance(width, bool) or not isinstance(width, int) or width < 1 or not isinstance(dtype, torch.dtype):
                raise ValueError(f"BlockPool field {name!r} must be (width >= 1, torch.dtype), got {(width, dtype)!r}")
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.page_size = page_size
        self.field_specs: dict[str, FieldSpec] = dict(fields)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.layers: list[dict[str, torch.Tensor]] = [
            {
                name: torch.zeros(num_pages, num_kv_heads, page_size, width, dtype=dtype, device=self.device)
                for name, (width, dtype) in self.field_specs.items()
            }
            for _ in range(num_layers)
        ]
        self._refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low ids first

    # ----------------------------------------------------------------------------------------- ownership
    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def pages_used(self) -> int:
        """Pages with at least one reference."""
        return self.num_pages - len(self._free)

    @property
    def pages_shared(self) -> int:
        """Pages with more than one owner."""
        return sum(1 for rc in self._refcount if rc > 1)

    def refcount(self, page: int) -> int:
        """Number of owners of `page` (0 = free)."""
        self._check_id(page)
        return self._refcount[page]

    def alloc(self, n: int) -> list[int]:
        """Take `n` free pages, each with refcount 1; raises (state untouched) when fewer than `n` are free."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"BlockPool.alloc needs a page count >= 0, got {n!r}")
        if n > len(self._free):
            raise RuntimeError(
                f"BlockPool exhausted: {n} pages requested, {len(self._free)} free of {self.num_pages} "
                f"({self.page_size} tokens each); raise the pool size (PrefixCache max_tokens) or release/evict pages"
            )
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one reference per listed page (repeats count twice); every page must already be in use."""
        pages = list(pages)
        for p in pages:
            self._check_id(p)
            if self._refcount[p] == 0:
                raise RuntimeError(f"BlockPool.incref of free page {p}: only pages from alloc() can be shared")
        for p in pages:
            self._refcount[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference per listed page; pages reaching 0 return to the free list. Returns how many did."""
        counts = Counter(pages)
        for p, c in counts.items():
            self._check_id(p)
            if c > self._refcount[p]:
                raise RuntimeError(
                    f"BlockPool.decref of page {p} {c} time(s) but it has {self._refcount[p]} reference(s): "
                    "a page was released more often than it was taken"
                )
        freed = 0
        for p, c in counts.items():
            self._refcount[p] -= c
            if self._refcount[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def copy_on_write(self, page: int) -> int:
        """A page the caller owns alone with `page`'s contents: `page` itself at refcount 1, else a fresh copy
        (every layer and field copied) that replaces the caller's reference to the shared page."""
        self._check_id(page)
        if self._refcount[page] == 0:
            raise RuntimeError(f"BlockPool.copy_on_write of free page {page}: the caller does not own it")
        if self._refcount[page] == 1:
            return page
        (fresh,) = self.alloc(1)
        for layer in self.layers:
            for buf in layer.values():
                buf[fresh].copy_(buf[page])
        self._refcount[page] -= 1  # > 0 afterwards: the other owners keep it
        return fresh

    # ------------------------------------------------------------------------------------------ contents
    def write(self, layer: int, values: Mapping[str, torch.Tensor], page: int, slot: int = 0) -> None:
        """Write tokens (H, n, X) per field into one page from `slot` on (slot + n <= page_size)."""
        n = self._token_count(values)
        if slot < 0 or slot + n > self.page_size:
            raise ValueError(f"BlockPool.write of {n} tokens at slot {slot} overflows a page of {self.page_size}")
        self.write_tokens(layer, values, [page], start=slot)

    def write_tokens(self, layer: int, values: Mapping[str, torch.Tensor], pages: list[int], start: int = 0) -> None:
        """Vectorised write: token i of `values` (H, n, X per field) lands at position start + i of the
        concatenated `pages`. Pages must be owned by the caller alone (use copy_on_write on shared ones)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"BlockPool layer {layer} out of range: the pool has {self.num_layers} layers")
        n = self._token_count(values)
        if start < 0 or start + n > len(pages) * self.page_size:
            raise ValueError(
                f"BlockPool.write_tokens: {n} tokens from position {start} do not fit in {len(pages)} pages "
                f"of {self.page_size}"
            )
        if set(values) != set(self.field_specs):
            raise ValueError(f"BlockPool.write_tokens fields {sorted(values)} != pool fields {sorted(self.field_specs)}")
        for p in pages:
            self._check_id(p)
            if self._refcount[p] != 1:
                raise RuntimeError(
                    f"BlockPool.write_tokens into page {p} with refcount {self._refcount[p]}: writes need a page "
                    "owned by the caller alone (alloc() it, or copy_on_write() a shared one)"
                )
        for name, value in values.items():
            width, dtype = self.field_specs[name]
            if tuple(value.shape) != (self.num_kv_heads, n, width) or value.dtype != dtype:
                raise ValueError(
                    f"BlockPool field {name!r}: expected ({self.num_kv_heads}, {n}, {width}) {dtype}, "
                    f"got {tuple(value.shape)} {value.dtype}"
                )
        if len(set(pages)) != len(pages):
            raise ValueError(f"BlockPool.write_tokens: page ids {pages} repeat; each token position needs its own")
        for name, value in values.items():
            self._write_field(self.layers[layer][name], value.to(self.device), pages, start)

    def _write_field(self, buf: torch.Tensor, value: torch.Tensor, pages: list[int], start: int) -> None:
        # A partial first page, whole pages in one index_copy_, a partial last page: at most three ops.
        # (A per-token scatter with two index tensors is ~500x slower on CPU for 4k tokens.)
        s, n = self.page_size, value.shape[1]
        page_i, slot = divmod(start, s)
        done = 0
        if slot:
            done = min(s - slot, n)
            buf[pages[page_i], :, slot : slot + done] = value[:, :done]
            page_i += 1
        full = (n - done) // s
        if full:
            idx = torch.tensor(pages[page_i : page_i + full], dtype=torch.long, device=self.device)
            chunk = value[:, done : done + full * s].reshape(value.shape[0], full, s, value.shape[2])
            buf.transpose(0, 1).index_copy_(1, idx, chunk)  # (H, P, S, X) view: the source needs no transpose
            done += full * s
            page_i += full
        if done < n:
            buf[pages[page_i], :, : n - done] = value[:, done:]

    def gather(self, layer: int, pages: list[int], n_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The first `n_tokens` (default all) tokens of `pages` for one layer as contiguous (H, n, X) per field."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"BlockPool layer {layer} out of range: the pool has {self.num_layers} layers")
        n = len(pages) * self.page_size if n_tokens is None else n_tokens
        if not 0 <= n <= len(pages) * self.page_size:
            raise ValueError(f"BlockPool.gather of {n} tokens from {len(pages)} pages of {self.page_size}")
        for p in pages:
            self._check_id(p)
            if self._refcount[p] == 0:
                raise RuntimeError(f"BlockPool.gather reads free page {p}: hold a reference (match/lock) first")
        if not pages:
            return {name: buf.new_empty(self.num_kv_heads, 0, buf.shape[-1]) for name, buf in self.layers[layer].items()}
        idx = torch.tensor(pages, dtype=torch.long, device=self.device)
        out = {}
        for name, buf in self.layers[layer].items():
            rows = buf.transpose(0, 1).index_select(1, idx)  # one copy, already (H, P, S, X) contiguous
            out[name] = rows.view(self.num_kv_heads, -1, buf.shape[-1])[:, :n].contiguous()
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every page tensor of every layer (for memory accounting)."""
        return [t for layer in self.layers for t in layer.values()]

    def nbytes(self) -> int:
        """Bytes held by the page tensors (the whole pool, used or not)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def check_invariants(self) -> None:
        """Every page is either in the free list (once, refcount 0) or referenced (refcount > 0), never both."""
        free = Counter(self._free)
        dup = [p for p, c in free.items() if c > 1]
        if dup:
            raise RuntimeError(f"BlockPool invariant broken: pages {dup[:8]} are in the free list more than once")
        for p, rc in enumerate(self._refcount):
            if rc < 0 or (rc == 0) != (p in free):
                raise RuntimeError(
                    f"BlockPool invariant broken: page {p} has refcount {rc} and is "
                    f"{'' if p in free else 'not '}in the free list"
                )

    # ----------------------------------------------------------------------------------------- helpers
    def _check_id(self, page: int) -> None:
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise ValueError(f"BlockPool page id {page!r} out of range [0, {self.num_pages})")

    @staticmethod
    def _token_count(values: Mapping[str, torch.Tensor]) -> int:
        counts = {name: (v.shape[1] if v.dim() == 3 else -1) for name, v in values.items()}
        if not counts or len(set(counts.values())) != 1 or -1 in counts.values():
            raise ValueError(f"BlockPool writes need every field shaped (H, n, X) with the same n, got {counts}")
        return next(iter(counts.values()))
