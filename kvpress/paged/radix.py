"""RadixTree: token-id prefixes -> KV pages, so requests that share a prompt prefix share its pages.

Keys are page-aligned: every edge holds a token run whose length is a multiple of `page_size`, and the node holds
the page ids of those tokens (one page per `page_size` tokens). A prefix is therefore matched in whole pages, and
two children of a node always differ in their first page, which is the key of the children dict.

Ownership (one reference per owner, counted by the pool):
- the tree holds exactly one reference to each page stored in its nodes (taken by `insert`, dropped by `evict`);
- `match_prefix` takes no reference: its pages stay valid while the returned node is locked (locked nodes are never
  evicted) - or take your own with `pool.incref`;
- `insert` never consumes the caller's references: it increfs the pages it adopts (those of tokens not yet in the
  tree) and ignores the caller's pages of tokens already present (the tree keeps its own). The caller drops its
  references afterwards either way; pages of duplicate tokens then return to the free list.

Locks: `lock(node)` adds 1 to `lock_ref` of node and every ancestor, so `lock_ref > 0` exactly on the paths of
live users; eviction only removes leaves with `lock_ref == 0`, least recently used first (a logical clock ticks on
every match/insert and stamps the nodes of the path). Namespaces: one root per namespace string, so KV computed
under different model/press/quantization settings never matches across them.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from typing import Protocol


class PageRefs(Protocol):
    """What the tree needs from a page pool: reference counting (BlockPool provides it)."""

    def incref(self, pages: Iterable[int]) -> None: ...

    def decref(self, pages: Iterable[int]) -> int: ...


class RadixNode:
    """One edge of the tree: its tokens (a multiple of page_size), their pages, children by first page."""

    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "own_locks", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None, last_access: int) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0  # locks on this node or any descendant
        self.own_locks = 0  # locks taken on this node itself
        self.last_access = last_access

    @property
    def is_root(self) -> bool:
        return self.parent is None


class RadixTree:
    """Page-aligned radix tree over token ids with per-namespace roots, path locks and LRU leaf eviction.

    Not thread-safe by itself (even `match_prefix` splits nodes): a PrefixCache serialises every call under its lock."""

    def __init__(self, pool: PageRefs, page_size: int) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"RadixTree page_size must be an int >= 1, got {page_size!r}")
        self.pool = pool
        self.page_size = page_size
        self._roots: dict[str, RadixNode] = {}
        self._held: set[int] = set()  # pages the tree holds a reference to
        self._clock = 0

    @property
    def total_pages(self) -> int:
        """Pages referenced by the tree (each once)."""
        return len(self._held)

    def held_pages(self) -> frozenset[int]:
        """The pages the tree holds one reference to."""
        return frozenset(self._held)

    @property
    def namespaces(self) -> list[str]:
        return list(self._roots)

    def root(self, namespace: str = "") -> RadixNode:
        """The root of `namespace` (created empty on first use)."""
        if not isinstance(namespace, str):
            raise ValueError(f"RadixTree namespace must be a str, got {type(namespace).__name__}")
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = RadixNode((), [], None, self._clock)
        return node

    # --------------------------------------------------------------------------------------- lookups
    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> tuple[int, list[int], RadixNode]:
        """Longest page-aligned stored prefix of `tokens`: (n_tokens, its pages, the node ending exactly there).

        A match ending inside an edge splits that node, so the returned node can be locked for exactly the match.
        """
        tokens = tuple(tokens)
        now = self._tick()
        node = self.root(namespace)
        node.last_access = now
        pages: list[int] = []
        pos = 0
        while len(tokens) - pos >= self.page_size:
            child = node.children.get(tokens[pos : pos + self.page_size])
            if child is None:
                break
            m = self._common_pages(child.key, tokens, pos)
            if m < len(child.pages):
                child = self._split(child, m)
            child.last_access = now
            pages.extend(child.pages)
            pos += m * self.page_size
            node = child
        return pos, pages, node

    def path_pages(self, node: RadixNode) -> list[int]:
        """Pages of every node from the root down to `node`, in token order."""
        chunks = []
        while node.parent is not None:
            chunks.append(node.pages)
            node = node.parent
        return [p for chunk in reversed(chunks) for p in chunk]

    # -------------------------------------------------------------------------------------- mutations
    def insert(self, tokens: Sequence[int], pages: Sequence[int], namespace: str = "") -> RadixNode:
        """Store `pages` (one per page_size tokens) for `tokens`; returns the node ending at the last token.

        Tokens already present keep the tree's pages (the caller's are ignored); new tokens adopt the caller's
        pages with one new reference each. See the module docstring for ownership.
        """
        tokens = tuple(tokens)
        pages = list(pages)
        if len(tokens) != len(pages) * self.page_size:
            raise ValueError(
                f"RadixTree.insert needs page-aligned input: {len(tokens)} tokens for {len(pages)} pages of "
                f"{self.page_size} (truncate tokens to len(pages) * page_size)"
            )
        now = self._tick()
        node = self.root(namespace)
        node.last_access = now
        pos = 0  # in pages
        while pos < len(pages):
            start = pos * self.page_size
            first = tokens[start : start + self.page_size]
            child = node.children.get(first)
            if child is None:
                new_pages = pages[pos:]
                self._check_new_pages(new_pages)
                self.pool.incref(new_pages)
                child = RadixNode(tokens[start:], new_pages, node, now)
                node.children[first] = child
                self._held.update(new_pages)
                return child
            m = self._common_pages(child.key, tokens, start)
            if m < len(child.pages):
                child = self._split(child, m)
            child.last_access = now
            pos += m
            node = child
        return node

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction until the matching `unlock`."""
        node.own_locks += 1
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`."""
        if node.own_locks <= 0:
            raise RuntimeError("RadixTree.unlock of a node that is not locked (unlock called twice?)")
        node.own_locks -= 1
        while node is not None:
            node.lock_ref -= 1
            node = node.parent

    def evictable_pages(self) -> int:
        """Pages in unlocked nodes: what `evict` can drop (all of them, leaves first)."""
        return sum(len(n.pages) for n in self._nodes() if n.lock_ref == 0)

    def evict(self, n_pages: int) -> int:
        """Drop least-recently-used unlocked leaves (repeatedly: parents that become leaves qualify) until
        `n_pages` pages went back to the pool or nothing unlocked is left. Returns pages freed in the pool."""
        order = itertools.count()
        heap = [(n.last_access, next(order), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < n_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            self._held.difference_update(leaf.pages)
            freed += self.pool.decref(leaf.pages)
            leaf.parent = None
            if not parent.is_root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed

    # ------------------------------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Edges page-aligned and keyed by their first page; lock counts consistent along paths; parents used no
        earlier than their children; every held page in exactly one node."""
        seen: set[int] = set()
        for ns, root in self._roots.items():
            if root.key or root.pages:
                raise RuntimeError(f"RadixTree invariant broken: root of namespace {ns!r} holds tokens")
            stack = [root]
            while stack:
                node = stack.pop()
                locks = node.own_locks + sum(c.lock_ref for c in node.children.values())
                if node.lock_ref != locks or node.own_locks < 0:
                    raise RuntimeError(
                        f"RadixTree invariant broken: lock_ref {node.lock_ref} != own {node.own_locks} + children"
                    )
                if not node.is_root:
                    if not node.pages or len(node.key) != len(node.pages) * self.page_size:
                        raise RuntimeError(
                            f"RadixTree invariant broken: edge of {len(node.key)} tokens holds {len(node.pages)} pages"
                        )
                    overlap = seen.intersection(node.pages)
                    if overlap or len(set(node.pages)) != len(node.pages):
                        raise RuntimeError(f"RadixTree invariant broken: pages {sorted(overlap)[:8]} owned twice")
                    seen.update(node.pages)
                for first, child in node.children.items():
                    if child.parent is not node or child.key[: self.page_size] != first:
                        raise RuntimeError("RadixTree invariant broken: child linked under the wrong key or parent")
                    if child.last_access > node.last_access:
                        raise RuntimeError("RadixTree invariant broken: a child was used after its parent")
                    stack.append(child)
        if seen != self._held:
            raise RuntimeError(
                f"RadixTree invariant broken: nodes hold {len(seen)} pages but the tree counts {len(self._held)}"
            )

    # ---------------------------------------------------------------------------------------- helpers
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _nodes(self) -> list[RadixNode]:
        out, stack = [], [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _common_pages(self, key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
        """Whole pages shared by edge `key` and `tokens[start:]`."""
        s = self.page_size
        n = min(len(key), len(tokens) - start) // s
        if key[: n * s] == tokens[start : start + n * s]:
            return n
        m = 0
        while m < n and key[m * s : (m + 1) * s] == tokens[start + m * s : start + (m + 1) * s]:
            m += 1
        return m

    def _split(self, node: RadixNode, m: int) -> RadixNode:
        """Cut `node` after its first `m` pages; the new upper node is returned, `node` keeps the lower part
        (so a handle on `node` still means the same tokens, and its locks are counted by the new parent)."""
        s = self.page_size
        upper = RadixNode(node.key[: m * s], node.pages[:m], node.parent, node.last_access)
        upper.lock_ref = node.lock_ref
        node.parent.children[node.key[:s]] = upper
        node.key = node.key[m * s :]
        node.pages = node.pages[m:]
        node.parent = upper
        upper.children[node.key[:s]] = node
        return upper

    def _check_new_pages(self, pages: list[int]) -> None:
        dup = self._held.intersection(pages)
        if dup or len(set(pages)) != len(pages):
            raise ValueError(
                f"RadixTree.insert: pages {sorted(dup)[:8] or pages} are already in the tree or repeated; "
                "each new token page needs its own page id"
            )
