"""RadixTree tests: page-aligned match/insert/split, ownership, locks vs eviction, LRU order, namespaces, and a
seeded random sequence of operations checking the invariants after every step."""
import random

import pytest
import torch

from kvpress.paged.pool import BlockPool
from kvpress.paged.radix import RadixNode, RadixTree

S = 4  # page size used throughout


def make_tree(num_pages: int = 32) -> tuple[BlockPool, RadixTree]:
    pool = BlockPool(num_pages, 1, 1, {"k": (1, torch.float32)}, page_size=S)
    return pool, RadixTree(pool, S)


def put(pool: BlockPool, tree: RadixTree, tokens: list[int], namespace: str = "") -> RadixNode:
    """What a caller does: reuse the stored prefix, allocate pages for the rest, insert, drop its references."""
    tokens = tokens[: len(tokens) // S * S]
    n, pages, node = tree.match_prefix(tokens, namespace)
    tree.lock(node)
    new = pool.alloc(len(tokens) // S - len(pages))
    leaf = tree.insert(tokens, pages + new, namespace)
    pool.decref(new)
    tree.unlock(node)
    return leaf


def check(pool: BlockPool, tree: RadixTree) -> None:
    pool.check_invariants()
    tree.check_invariants()
    held = tree.held_pages()
    for p in range(pool.num_pages):
        assert pool.refcount(p) == (p in held), f"page {p}: refcount {pool.refcount(p)}, in tree {p in held}"


def test_insert_then_match_longest_page_aligned_prefix():
    pool, tree = make_tree()
    seq = list(range(100, 112))  # 3 pages
    pages = pool.alloc(3)
    leaf = tree.insert(seq, pages)
    pool.decref(pages)
    assert tree.total_pages == 3 and all(pool.refcount(p) == 1 for p in pages)
    assert tree.match_prefix(seq + [1, 2, 3])[:2] == (12, pages)  # extra tail: partial page not matched
    n, got, node = tree.match_prefix(seq[:10])  # 2.5 pages -> 2 pages, splits the edge
    assert (n, got) == (8, pages[:2]) and node.parent.is_root and node.children
    assert tree.path_pages(leaf) == pages and leaf.parent is node
    assert tree.match_prefix([1, 2, 3, 4, 5])[:2] == (0, [])
    assert tree.match_prefix(seq[:3])[:2] == (0, [])
    check(pool, tree)


def test_insert_splits_on_partial_match_and_shares_prefix_pages():
    pool, tree = make_tree()
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    b = [1, 1, 1, 1, 2, 2, 2, 2, 9, 9, 9, 9, 8, 8, 8, 8]
    leaf_a = put(pool, tree, a)
    leaf_b = put(pool, tree, b)
    assert leaf_a.parent is leaf_b.parent  # the shared 2-page prefix became one node with two children
    shared = leaf_a.parent
    assert len(shared.pages) == 2 and set(shared.children) == {(3, 3, 3, 3), (9, 9, 9, 9)}
    assert tree.total_pages == 5 and pool.pages_used == 5
    assert tree.path_pages(leaf_a)[:2] == tree.path_pages(leaf_b)[:2]
    # Divergence inside a page: only the whole common pages are shared.
    c = [1, 1, 1, 1, 2, 2, 2, 7]
    put(pool, tree, c)
    assert tree.total_pages == 6 and tree.match_prefix(c)[0] == 8
    check(pool, tree)


def test_insert_ignores_callers_pages_for_tokens_already_present():
    pool, tree = make_tree()
    seq = list(range(8))
    first = pool.alloc(2)
    tree.insert(seq, first)
    pool.decref(first)
    again = pool.alloc(3)  # caller recomputed everything: the first two pages are duplicates
    tree.insert(seq + [50, 51, 52, 53], again)
    assert tree.path_pages(tree.match_prefix(seq + [50, 51, 52, 53])[2]) == first + again[2:]
    assert [pool.refcount(p) for p in again] == [1, 1, 2]  # only the new page was adopted
    assert pool.decref(again) == 2  # duplicates go back to the pool with the caller's reference
    check(pool, tree)


def test_insert_validation():
    pool, tree = make_tree()
    pages = pool.alloc(2)
    with pytest.raises(ValueError, match="page-aligned"):
        tree.insert(list(range(7)), pages)
    tree.insert(list(range(8)), pages)
    with pytest.raises(ValueError, match="already in the tree"):
        tree.insert(list(range(20, 28)), pages)
    with pytest.raises(ValueError, match="namespace"):
        tree.match_prefix([1], namespace=3)  # type: ignore[arg-type]
    pool.decref(pages)
    check(pool, tree)


def test_lock_protects_path_from_eviction():
    pool, tree = make_tree()
    a = list(range(12))
    b = list(range(8)) + [70, 71, 72, 73]
    put(pool, tree, a)
    put(pool, tree, b)
    n, pages, node = tree.match_prefix(b)
    tree.lock(node)
    assert tree.evictable_pages() == 1  # a's private page; b's path is locked
    assert tree.evict(100) == 1
    assert tree.match_prefix(b)[:2] == (12, pages) and tree.match_prefix(a)[0] == 8
    assert all(pool.refcount(p) == 1 for p in pages)
    tree.unlock(node)
    with pytest.raises(RuntimeError, match="not locked"):
        tree.unlock(node)
    assert tree.evict(100) == 3 and tree.total_pages == 0 and pool.pages_used == 0  # cascades up to the root
    check(pool, tree)


def test_lock_on_a_node_survives_a_later_split():
    pool, tree = make_tree()
    seq = list(range(12))
    leaf = put(pool, tree, seq)
    tree.lock(leaf)
    put(pool, tree, list(range(4)) + [90, 91, 92, 93])  # splits the locked edge after its first page
    assert leaf.parent is not None and not leaf.parent.is_root and leaf.parent.lock_ref == 1
    tree.evict(100)
    assert tree.match_prefix(seq)[0] == 12
    tree.unlock(leaf)
    check(pool, tree)
    assert tree.evict(100) == 3 and pool.pages_used == 0


def test_evict_is_lru_over_leaves():
    pool, tree = make_tree()
    seqs = {name: [base + i for i in range(8)] for name, base in (("a", 0), ("b", 100), ("c", 200))}
    for tokens in seqs.values():
        put(pool, tree, tokens)
    tree.match_prefix(seqs["a"])  # a becomes the most recently used
    assert tree.evict(1) == 2  # a whole leaf goes: b, the least recently used
    assert [tree.match_prefix(seqs[k])[0] for k in "abc"] == [8, 0, 8]
    tree.match_prefix(seqs["a"])
    assert tree.evict(2) == 2
    assert [tree.match_prefix(seqs[k])[0] for k in "abc"] == [8, 0, 0]
    check(pool, tree)


def test_evict_prefers_old_leaf_over_recently_used_branch():
    pool, tree = make_tree()
    stem = list(range(4))
    old = put(pool, tree, stem + [10, 11, 12, 13])
    put(pool, tree, stem + [20, 21, 22, 23])
    assert tree.evict(1) == 1 and old.parent is None  # old leaf evicted, shared stem still has a child
    assert tree.match_prefix(stem + [20, 21, 22, 23])[0] == 8
    check(pool, tree)


def test_namespaces_are_isolated():
    pool, tree = make_tree()
    seq = list(range(8))
    put(pool, tree, seq, namespace="model-a|int8")
    assert tree.match_prefix(seq, namespace="model-a|fp16")[0] == 0
    put(pool, tree, seq, namespace="model-a|fp16")
    pa = tree.match_prefix(seq, namespace="model-a|int8")[1]
    pb = tree.match_prefix(seq, namespace="model-a|fp16")[1]
    assert len(pa) == len(pb) == 2 and not set(pa) & set(pb)
    assert set(tree.namespaces) == {"model-a|int8", "model-a|fp16"} and tree.total_pages == 4
    check(pool, tree)


def test_check_invariants_detects_corruption():
    pool, tree = make_tree()
    leaf = put(pool, tree, list(range(8)))
    leaf.lock_ref = 1  # a lock count with no lock behind it
    with pytest.raises(RuntimeError, match="lock_ref"):
        tree.check_invariants()
    leaf.lock_ref = 0
    leaf.pages = leaf.pages[:1]
    with pytest.raises(RuntimeError, match="holds 1 pages"):
        tree.check_invariants()


def test_random_operations_keep_invariants():
    rng = random.Random(1234)
    pool, tree = make_tree(num_pages=24)
    namespaces = ["", "other"]
    live: list[tuple[RadixNode, str, list[int], list[int]]] = []  # locked node, namespace, tokens, pages
    freed_total = max_live = 0

    def random_tokens() -> list[int]:
        # A few families of prefixes so that sequences share, diverge mid-edge and mid-page.
        family = rng.randrange(3)
        n = rng.randrange(0, 7 * S)
        return [family * 1000 + (i if rng.random() < 0.9 else rng.randrange(50)) for i in range(n)]

    for step in range(400):
        op = rng.choice(["insert", "insert", "match_lock", "unlock", "evict"])
        ns = rng.choice(namespaces)
        if op == "insert":
            tokens = random_tokens()
            tokens = tokens[: len(tokens) // S * S]
            n, pages, node = tree.match_prefix(tokens, ns)
            tree.lock(node)
            need = len(tokens) // S - len(pages)
            if need > pool.pages_free:
                tree.evict(need - pool.pages_free)
            if need <= pool.pages_free:
                new = pool.alloc(need)
                tree.insert(tokens, pages + new, ns)
                pool.decref(new)
            tree.unlock(node)
        elif op == "match_lock":
            tokens = random_tokens()
            n, pages, node = tree.match_prefix(tokens, ns)
            tree.lock(node)
            live.append((node, ns, tokens[:n], pages))
            max_live = max(max_live, len(live))
        elif op == "unlock" and live:
            node, *_ = live.pop(rng.randrange(len(live)))
            tree.unlock(node)
        elif op == "evict":
            before = pool.pages_free
            freed = tree.evict(rng.randrange(1, 8))
            assert pool.pages_free == before + freed
            freed_total += freed
        check(pool, tree)
        for node, ns_, tokens, pages in live:  # locked nodes are still attached and still hold the same pages
            top = node
            while top.parent is not None:
                top = top.parent
            assert top is tree.root(ns_), f"step {step}: a locked node was evicted"
            assert tree.path_pages(node) == pages
    assert freed_total > 0 and max_live > 2  # the run did exercise eviction under several locks
    for node, *_ in live:
        tree.unlock(node)
    tree.evict(pool.num_pages)
    assert tree.total_pages == 0 and pool.pages_used == 0  # no leaked pages
    check(pool, tree)
