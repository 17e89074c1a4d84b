"""PagedKVCache: the cache of one generate call that reads shared prompt prefixes from a PrefixCache's pages."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .cache import KVPressCache
from .config import head_dim_of
from .paged.prefix_cache import PrefixCache, PrefixHit
from .quant.spec import QuantSpec


def shared_codes_spec(prefix_cache: PrefixCache, head_dim: int | None = None) -> QuantSpec | None:
    """The encoding whose codes `prefix_cache` keeps beside full precision (its `quant`), parsed and, for a model of
    `head_dim`, fitted to it as wrap fits its `quant` (QuantSpec.fit: default groups adapt, so the pool's codes equal
    a wrapped request's); None if none."""
    if prefix_cache.quant is None:
        return None
    try:
        spec = QuantSpec.parse(prefix_cache.quant).for_storage("a PrefixCache stores tokens in pages")
        return spec if head_dim is None else spec.fit(head_dim)
    except ValueError as err:
        raise ValueError(f"PrefixCache(quant={prefix_cache.quant!r}) is not a valid quantization"
                         f"{'' if head_dim is None else f' for head_dim={head_dim}'}: {err}") from None


def same_codes(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    """Whether two specs give every token the same codes (sinks and window size do not change a token's codes)."""
    return a is not None and b is not None and a.build_codec() == b.build_codec()  # codecs compare by value


class PagedKVCache(KVPressCache):
    """KVPressCache whose rows start with prefixes shared through `prefix_cache` (page tables, read in place).

    Use it on a wrapped model: `model.generate(**inputs, past_key_values=PagedKVCache(model.config, prefix_cache))`
    matches each row against the prefix cache, computes only the rest and stores the new prompt afterwards (the same
    as `wrap(model, paged=True, prefix_cache=...)`). One cache per generate call.
    """

    def __init__(self, config, prefix_cache: PrefixCache, press: Any = None, quant: Any = None, **kwargs: Any) -> None:
        if not isinstance(prefix_cache, PrefixCache):
            raise ValueError(f"PagedKVCache needs a kvpress.PrefixCache, got {type(prefix_cache).__name__}.")
        shared_codes_spec(prefix_cache, head_dim_of(config.get_text_config(decoder=True)))
        super().__init__(config, press=press, quant=quant, paged=True, **kwargs)
        self.prefix_cache = prefix_cache
        self.row_pages: list[list[int]] = []  # per row: the shared pages it matched
        self.row_matched: list[int] = []  # per row: prompt tokens reused instead of computed

    def record_hits(self, hits: list[PrefixHit]) -> None:
        self.row_pages = [list(h.pages) for h in hits]
        self.row_matched = [h.n_tokens for h in hits]

    def stats(self) -> dict[str, Any]:
        """KVPressCache.stats() (bytes this request holds privately) plus the shared pages it used.

        `pages_used`: distinct pool pages its rows matched; `pages_shared`: those matched by more than one of its
        rows; `shared_nbytes`: their bytes, held once by the PrefixCache (not in `nbytes`); `matched_tokens`: prompt
        tokens per row that were not recomputed. Uncompressed requests read these pages in place, quantized ones
        whose encoding the PrefixCache keeps read its codes in place; other compressed requests hold a compressed
        copy (counted in `nbytes`)."""
        stats = super().stats()
        counts = Counter(page for pages in self.row_pages for page in pages)
        pool = self.prefix_cache.pool
        page_bytes = pool.nbytes() // pool.num_pages if pool is not None else 0
        stats.update(
            pages_used=len(counts),
            pages_shared=sum(1 for c in counts.values() if c > 1),
            shared_nbytes=len(counts) * page_bytes,
            matched_tokens=list(self.row_matched),
        )
        return stats
