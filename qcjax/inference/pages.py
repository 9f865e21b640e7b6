"""The page allocator and the prefix cache, host side (plain Python, no JAX).

Pages are fixed-size blocks of the device pool (qcjax.inference.programs): page p holds page_size consecutive tokens'
keys and values in every layer. A row holds a list of pages (its page table); a page's reference count is the number
of rows holding it. Pages whose every token is written ("full") are entered in the prefix cache under their content:
a node of a tree keyed by (parent node, the page's token ids, a namespace such as an adapter name), so a full page
is found only through the exact tokens before it. A new request walks the tree over its prompt's full pages and
starts with every page it finds (their keys and values are reused, not recomputed).

Invariants (tests/test_inference_pages.py drives random submit / cancel / finish / evict mixes against them):
- a page is free, or held (refcount > 0), or cached and idle (refcount 0, in the tree, evictable in LRU order);
- a cached page is never written again: rows write only at positions >= their length, and a row's cached prefix
  pages lie below its length;
- releasing a row's pages returns each reference exactly once.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Hashable, Sequence


class OutOfPages(Exception):
    """No free or evictable page is left."""


@dataclasses.dataclass(eq=False)
class _Node:
    key: tuple  # (parent node id, page token ids, namespace)
    page: int
    id: int


class PagePool:
    """Free list, reference counts and the prefix tree over `num_pages` pages of `page_size` tokens."""

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: both must be >= 1")
        self.num_pages, self.page_size, self.prefix_cache = int(num_pages), int(page_size), bool(prefix_cache)
        self.free: collections.deque[int] = collections.deque(range(self.num_pages))
        self.ref = [0] * self.num_pages
        self._tree: dict[tuple, _Node] = {}  # key -> node
        self._node_of: dict[int, _Node] = {}  # page -> its node (cached pages only)
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, refcount 0; LRU first
        self._ids = itertools.count(1)
        self.evictions = 0

    # ---- counts ----
    @property
    def used(self) -> int:
        """Pages held by rows."""
        return self.num_pages - len(self.free) - len(self._idle)

    @property
    def cached(self) -> int:
        """Pages in the prefix tree (held or idle)."""
        return len(self._node_of)

    def available(self) -> int:
        """Pages an allocation can get now: free plus idle cached ones (evicted on demand)."""
        return len(self.free) + len(self._idle)

    # ---- allocation ----
    def allocate(self, n: int) -> list[int]:
        """n pages for a row (refcount 1 each), evicting idle cached pages least-recently-used first."""
        if n > self.available():
            raise OutOfPages(f"{n} pages asked, {self.available()} available")
        out = []
        for _ in range(n):
            if not self.free:
                page, _ = self._idle.popitem(last=False)
                self._forget(page)
                self.evictions += 1
                self.free.append(page)
            page = self.free.popleft()
            self.ref[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page: a page no row holds goes back to the free list, or, if it is in the
        prefix cache, stays there as idle (most recently used)."""
        for p in pages:
            if self.ref[p] <= 0:
                raise AssertionError(f"page {p} released more often than it was held")
            self.ref[p] -= 1
            if self.ref[p] == 0:
                if p in self._node_of:
                    self._idle[p] = None
                else:
                    self.free.append(p)

    def _forget(self, page: int) -> None:
        node = self._node_of.pop(page)
        del self._tree[node.key]  # its descendants become unreachable (their keys name this node's id): evicted in turn

    # ---- the prefix cache ----
    def lookup(self, tokens: Sequence[int], limit: int, namespace: Hashable = None) -> list[int]:
        """The cached pages holding the longest run of full pages of tokens[:limit] (limit: how many tokens may
        come from the cache; a request must compute at least its last prompt token). Each found page gains a
        reference (the caller now holds it)."""
        if not self.prefix_cache:
            return []
        pages, parent = [], 0
        ps = self.page_size
        for i in range(min(limit, len(tokens)) // ps):
            node = self._tree.get((parent, tuple(tokens[i * ps:(i + 1) * ps]), namespace))
            if node is None:
                break
            pages.append(node.page)
            parent = node.id
        for p in pages:
            if self.ref[p] == 0:
                del self._idle[p]
            self.ref[p] += 1
        return pages

    def register(self, tokens: Sequence[int], pages: Sequence[int], written: int, namespace: Hashable = None) -> None:
        """Enter the full pages of a row (its tokens and page table; `written`: how many tokens' keys and values
        the pages hold) in the prefix tree. A page whose content is already cached under another page stays
        private to its row (freed with it); pages already in the tree are left as they are."""
        if not self.prefix_cache:
            return
        ps, parent = self.page_size, 0
        for i in range(min(written, len(tokens)) // ps):
            key = (parent, tuple(tokens[i * ps:(i + 1) * ps]), namespace)
            node = self._tree.get(key)
            if node is None:
                if pages[i] in self._node_of:  # this page is cached under another key (cannot happen for a row's
                    break  # own written pages; stop rather than alias)
                node = _Node(key, pages[i], next(self._ids))
                self._tree[key] = node
                self._node_of[pages[i]] = node
            elif node.page != pages[i]:
                break  # the same content lives in another page; later pages of this row chain to their own copies
            parent = node.id

    def check(self) -> None:
        """Assert the invariants (tests)."""
        free, idle = set(self.free), set(self._idle)
        assert len(free) == len(self.free), "a page is twice in the free list"
        assert not free & idle, "a page is both free and cached"
        for p in range(self.num_pages):
            held = self.ref[p] > 0
            assert self.ref[p] >= 0
            assert [held, p in free, p in idle].count(True) == 1, f"page {p}: held/free/idle is not exactly one"
            assert p not in idle or p in self._node_of, f"idle page {p} is not in the prefix tree"

