"""PrefixCache tests: store/match/gather round trips, reuse of stored pages, eviction and the full-cache error,
namespaces, layout checks, no leaked pages, and a seeded random workload checking contents and invariants."""
import random

import pytest
import torch

from kvpress.paged.prefix_cache import PrefixCache

S = 4
HEADS = 2
LAYERS = 3


def kv_for(tokens: list[int], quantized: bool = False) -> list[dict[str, torch.Tensor]]:
    """Deterministic per-layer fields for a token sequence: each token's values depend on (layer, position, token),
    so any gathered prefix can be checked against this function."""
    n = len(tokens)
    tok = torch.tensor(tokens, dtype=torch.float32).view(1, n, 1)
    pos = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    head = torch.arange(HEADS, dtype=torch.float32).view(HEADS, 1, 1)
    layers = []
    for layer in range(LAYERS):
        base = tok * 7 + pos * 3 + head + layer * 1000
        if quantized:
            layers.append({
                "k": (base.remainder(256)).expand(HEADS, n, 8).to(torch.uint8),
                "k_scale": (base / 64).expand(HEADS, n, 2).to(torch.float16),
                "v": (base.remainder(251)).expand(HEADS, n, 4).to(torch.uint8),
                "v_scale": (base / 32).expand(HEADS, n, 2).to(torch.float16),
            })
        else:
            layers.append({"k": base.expand(HEADS, n, 6).clone(), "v": (-base).expand(HEADS, n, 6).clone()})
    return layers


def assert_hit_matches(cache: PrefixCache, hit, tokens: list[int], quantized: bool = False) -> None:
    want = kv_for(tokens[: hit.n_tokens], quantized)
    for layer in range(LAYERS):
        got = cache.gather(hit, layer)
        for name, value in want[layer].items():
            assert torch.equal(got[name], value), f"layer {layer} field {name} differs"


@pytest.mark.parametrize("quantized", [False, True])
def test_store_match_gather_round_trip(quantized):
    cache = PrefixCache(max_tokens=64, page_size=S)
    tokens = list(range(10, 21))  # 11 tokens: 2 whole pages are kept
    assert cache.store("m", tokens, kv_for(tokens, quantized)) == 8
    hit = cache.match("m", tokens + [99])
    assert hit.n_tokens == 8 and len(hit.pages) == 2
    assert_hit_matches(cache, hit, tokens, quantized)
    assert cache.stats()["pages_shared"] == 2  # held by the tree and by the live hit
    cache.release(hit)
    assert cache.stats()["pages_shared"] == 0 and cache.stats()["tokens_cached"] == 8
    cache.check_invariants()


def test_match_limit_and_misses():
    cache = PrefixCache(max_tokens=64, page_size=S)
    tokens = list(range(12))
    cache.store("m", tokens, kv_for(tokens))
    hit = cache.match("m", tokens, limit=len(tokens) - 1)  # keep one token to compute logits
    assert hit.n_tokens == 8
    miss = cache.match("m", [5] + tokens)
    assert miss.n_tokens == 0 and miss.pages == []
    assert cache.gather(miss, 0)["k"].shape == (HEADS, 0, 6)
    empty = PrefixCache(max_tokens=64, page_size=S).match("m", tokens)
    assert empty.n_tokens == 0
    for h in (hit, miss):
        cache.release(h)
    with pytest.raises(RuntimeError, match="twice"):
        cache.release(hit)
    with pytest.raises(RuntimeError, match="released"):
        cache.gather(hit, 0)
    cache.check_invariants()


def test_stored_prefix_is_reused_not_rewritten():
    cache = PrefixCache(max_tokens=64, page_size=S)
    system = list(range(100, 108))
    a, b = system + [1, 2, 3, 4], system + [5, 6, 7, 8, 9, 9, 9, 9]
    assert cache.store("m", a, kv_for(a)) == 12
    assert cache.store("m", a, kv_for(a)) == 0  # already there
    assert cache.store("m", b, kv_for(b)) == 8  # only the two pages after the shared system prompt
    assert cache.stats()["pages_used"] == 5
    ha, hb = cache.match("m", a), cache.match("m", b)
    assert ha.pages[:2] == hb.pages[:2] and ha.pages[2] != hb.pages[2]
    assert cache.stats()["pages_shared"] == 5 and cache.stats()["live_matches"] == 2
    assert_hit_matches(cache, ha, a)
    assert_hit_matches(cache, hb, b)
    cache.release(ha)
    cache.release(hb)
    cache.check_invariants()


def test_namespaces_are_isolated():
    cache = PrefixCache(max_tokens=64, page_size=S)
    tokens = list(range(8))
    cache.store("llama|snapkv0.5", tokens, kv_for(tokens))
    miss = cache.match("llama|h2o0.5", tokens)
    assert miss.n_tokens == 0
    cache.release(miss)
    assert cache.stats()["tokens_cached"] == 8


def test_full_cache_evicts_lru_unlocked_prefixes():
    cache = PrefixCache(max_tokens=4 * S, page_size=S)
    old, new, newer = [list(range(base, base + 2 * S)) for base in (0, 100, 200)]
    cache.store("m", old, kv_for(old))
    cache.store("m", new, kv_for(new))
    cache.release(cache.match("m", old))  # old is now more recent than new
    cache.store("m", newer, kv_for(newer))  # needs 2 pages: evicts `new`, the least recently used
    hits = {name: cache.match("m", t) for name, t in (("old", old), ("new", new), ("newer", newer))}
    assert {name: h.n_tokens for name, h in hits.items()} == {"old": 8, "new": 0, "newer": 8}
    assert_hit_matches(cache, hits["old"], old)
    assert_hit_matches(cache, hits["newer"], newer)
    for h in hits.values():
        cache.release(h)
    cache.check_invariants()


def test_full_cache_with_everything_locked_raises_and_changes_nothing():
    cache = PrefixCache(max_tokens=4 * S, page_size=S)
    a, b = list(range(2 * S)), list(range(50, 50 + 2 * S))
    cache.store("m", a, kv_for(a))
    cache.store("m", b, kv_for(b))
    ha, hb = cache.match("m", a), cache.match("m", b)
    before = cache.stats()
    c = list(range(300, 300 + S))
    with pytest.raises(RuntimeError, match=r"needs 1 pages of 4, 0 are free and 0 evictable.*raise max_tokens"):
        cache.store("m", c, kv_for(c))
    assert cache.stats() == before
    cache.check_invariants()
    assert_hit_matches(cache, ha, a)
    cache.release(ha)
    assert cache.store("m", c, kv_for(c)) == S  # the next call works once a match is released
    assert_hit_matches(cache, hb, b)
    cache.release(hb)
    cache.check_invariants()


def test_store_larger_than_cache_raises():
    cache = PrefixCache(max_tokens=2 * S, page_size=S)
    tokens = list(range(3 * S))
    with pytest.raises(RuntimeError, match="needs 3 pages"):
        cache.store("m", tokens, kv_for(tokens))
    assert cache.stats()["pages_used"] == 0
    cache.check_invariants()


def test_layout_and_shape_validation():
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(max_tokens=3, page_size=S)
    cache = PrefixCache(max_tokens=64, page_size=S)
    tokens = list(range(8))
    with pytest.raises(ValueError, match=r"expected \(2, 8, X\)"):
        cache.store("m", tokens, kv_for(tokens[:7]))
    cache.store("m", tokens, kv_for(tokens))
    with pytest.raises(ValueError, match="one model/storage layout"):
        cache.store("m", tokens, kv_for(tokens, quantized=True))
    with pytest.raises(ValueError, match="1-D"):
        cache.match("m", torch.zeros(1, 8, dtype=torch.long))
    hit = cache.match("m", torch.tensor(tokens))
    assert hit.n_tokens == 8
    cache.release(hit)
    cache.check_invariants()


def test_no_pages_leak_once_everything_is_released_and_evicted():
    cache = PrefixCache(max_tokens=16 * S, page_size=S)
    hits = []
    for i in range(5):  # 1 shared + 1..5 own pages: fills all 16 pages
        tokens = [7] * S + [i] * (i + 1) * S
        cache.store("m", tokens, kv_for(tokens))
        hits.append(cache.match("m", tokens))
    for h in hits:
        cache.release(h)
    assert cache.stats()["pages_shared"] == 0
    cache.tree.evict(cache.num_pages)
    stats = cache.stats()
    assert stats["pages_used"] == 0 and stats["tokens_cached"] == 0 and stats["pages_free"] == 16
    cache.check_invariants()


def test_random_workload_keeps_contents_and_invariants():
    rng = random.Random(7)
    cache = PrefixCache(max_tokens=12 * S, page_size=S)
    prompts = [[p * 100 + i for i in range(rng.randrange(S, 5 * S))] for p in range(4)]  # shared "system" prompts
    live: list[tuple[object, list[int]]] = []
    errors = 0
    for step in range(300):
        op = rng.choice(["store", "store", "match", "release"])
        tokens = rng.choice(prompts) + [rng.randrange(1000, 1010) for _ in range(rng.randrange(0, 6 * S))]
        ns = rng.choice(["a", "b"])
        if op == "store":
            before = cache.stats()
            try:
                cache.store(ns, tokens, kv_for(tokens))
            except RuntimeError as err:
                assert "PrefixCache full" in str(err)
                assert cache.stats() == before
                errors += 1
        elif op == "match":
            hit = cache.match(ns, tokens)
            live.append((hit, tokens))
        elif live:
            hit, _ = live.pop(rng.randrange(len(live)))
            cache.release(hit)
        cache.check_invariants()
        for hit, tok in live:  # locked prefixes are never evicted nor overwritten
            if hit.n_tokens and step % 10 == 0:
                assert_hit_matches(cache, hit, tok)
        if len(live) > 6:  # keep the workload from locking the whole cache forever
            hit, _ = live.pop(0)
            cache.release(hit)
    assert errors > 0 and cache.stats()["matched_tokens"] > 0
    for hit, tok in live:
        assert_hit_matches(cache, hit, tok)
        cache.release(hit)
    cache.tree.evict(cache.num_pages)
    assert cache.stats()["pages_used"] == 0
    cache.check_invariants()
