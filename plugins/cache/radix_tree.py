"""A page-granular radix tree over token ids: the index of a prefix cache.

Each edge holds a run of whole pages: `key` is its tokens (a multiple of `page_size` long) and
`pages` the KV pages holding them, one per `page_size` tokens. Children are keyed by the first
page of their edge, so a lookup costs one dict probe per edge plus a comparison of the edge.
A partial match inside an edge can split it; the split keeps the original node object as the
deeper half, so a reference to a node keeps naming the same prefix end.

A node may also keep a host copy of its pages (`host_pages`, used by the host-memory tier);
its device `pages` are then None once they were evicted. Device-resident nodes are closed
under taking parents: a node with device pages has a parent with device pages (or the root).

Locks: a request using a prefix locks the node where that prefix ends, which counts up
`lock_ref` on that node and every ancestor. Only nodes with `lock_ref == 0` may lose their
pages; `evictable_pages` counts their device pages. Recency for LRU is a logical clock, so
eviction order is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

Key = tuple[int, ...]


@dataclass(eq=False)
class TreeNode:
    """One edge of the tree and the node it leads to (see the module docstring)."""

    key: Key
    pages: list[int] | None
    parent: TreeNode | None = None
    children: dict[Key, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    host_pages: list[int] | None = None

    @property
    def num_pages(self) -> int:
        held = self.pages if self.pages is not None else self.host_pages
        return len(held) if held is not None else 0

    @property
    def on_device(self) -> bool:
        return self.pages is not None

    def path(self) -> list[TreeNode]:
        """The nodes from the root's child down to this node."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class Match:
    """The result of a lookup: `nodes` from the root's child to the deepest matched node, and
    `num_pages` matched in all (the last node may be matched in part when not split)."""

    nodes: list[TreeNode]
    num_pages: int

    @property
    def last(self) -> TreeNode | None:
        return self.nodes[-1] if self.nodes else None


class RadixTree:
    """The tree itself: lookup, insertion, locking and choosing what to evict.

    The tree never frees pages: eviction hands the chosen nodes to the caller, which decides
    what becomes of their pages (see `RadixCache`)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = TreeNode(key=(), pages=[], lock_ref=1)
        self.device_pages = 0  # device pages held by nodes
        self.evictable_pages = 0  # device pages held by unlocked nodes
        self._clock = 0

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ lookup

    def match(self, tokens: Sequence[int], split: bool = False, touch: bool = False) -> Match:
        """Walk the longest run of whole pages of `tokens` that the tree holds.

        `split`: split the last node when the match ends inside its edge, so `Match.last`
        ends exactly at the match. `touch`: mark the matched nodes as used now (LRU)."""
        ps = self.page_size
        node, i, nodes, matched = self.root, 0, [], 0
        now = self.tick() if touch else 0
        while i + ps <= len(tokens):
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                break
            common = self._common_pages(child.key, tokens, i)
            if common < child.num_pages:
                if split:
                    child = self.split(child, common)
                nodes.append(child)
                matched += common
                if touch:
                    child.last_access = now
                break
            nodes.append(child)
            matched += common
            if touch:
                child.last_access = now
            i += len(child.key)
            node = child
        return Match(nodes, matched)

    def _common_pages(self, key: Key, tokens: Sequence[int], start: int) -> int:
        ps, n = self.page_size, 1  # the first page matched through the children dict
        limit = min(len(key), len(tokens) - start) // ps
        while n < limit and key[n * ps : (n + 1) * ps] == tuple(
            tokens[start + n * ps : start + (n + 1) * ps]
        ):
            n += 1
        return n

    def split(self, node: TreeNode, num_pages: int) -> TreeNode:
        """Cut `node`'s edge after `num_pages` pages; return the new upper node.

        The original object keeps the lower half (its prefix end is unchanged) and the upper
        node inherits its lock count, so locks held on `node` stay correct."""
        ps = self.page_size
        cut = num_pages * ps
        upper = TreeNode(
            key=node.key[:cut],
            pages=node.pages[:num_pages] if node.pages is not None else None,
            parent=node.parent,
            lock_ref=node.lock_ref,
            last_access=node.last_access,
            host_pages=node.host_pages[:num_pages] if node.host_pages is not None else None,
        )
        node.parent.children[upper.key[:ps]] = upper
        node.key = node.key[cut:]
        if node.pages is not None:
            node.pages = node.pages[num_pages:]
        if node.host_pages is not None:
            node.host_pages = node.host_pages[num_pages:]
        node.parent = upper
        upper.children[node.key[:ps]] = node
        return upper

    # ------------------------------------------------------------------ insertion

    def insert(
        self, tokens: Sequence[int], pages: Sequence[int], start: TreeNode | None = None
    ) -> tuple[TreeNode, list[int], list[TreeNode]]:
        """Insert whole pages of `tokens` (held in `pages`) below `start` (default: the root).

        Where the tree already holds a page for the same tokens, the tree's page wins; a node
        that held the tokens only on the host takes the given pages as its device pages.
        Returns the node where the inserted key ends, the tree's device pages for the whole
        key (in order), and the nodes created."""
        ps = self.page_size
        node = start or self.root
        now = self.tick()
        tree_pages: list[int] = []
        created: list[TreeNode] = []
        i = 0
        while i < len(pages):
            child = node.children.get(tuple(tokens[i * ps : (i + 1) * ps]))
            if child is None:
                leaf = TreeNode(
                    key=tuple(tokens[i * ps : len(pages) * ps]),
                    pages=list(pages[i:]),
                    parent=node,
                    last_access=now,
                )
                node.children[leaf.key[:ps]] = leaf
                self.device_pages += leaf.num_pages
                self.evictable_pages += leaf.num_pages
                tree_pages.extend(leaf.pages)
                created.append(leaf)
                return leaf, tree_pages, created
            common = min(self._common_pages(child.key, tokens, i * ps), len(pages) - i)
            if common < child.num_pages:
                child = self.split(child, common)
            if child.pages is None:
                self._give_device_pages(child, list(pages[i : i + common]))
            child.last_access = now
            tree_pages.extend(child.pages)
            i += common
            node = child
        return node, tree_pages, created

    def _give_device_pages(self, node: TreeNode, pages: list[int]) -> None:
        node.pages = pages
        self.device_pages += len(pages)
        if node.lock_ref == 0:
            self.evictable_pages += len(pages)

    def load(self, node: TreeNode, pages: list[int]) -> None:
        """Give a host-only node device pages (its KV was copied back from the host)."""
        self._give_device_pages(node, pages)

    # ------------------------------------------------------------------ locks

    def lock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0 and node.pages is not None:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.pages is not None:
                self.evictable_pages += len(node.pages)
            node = node.parent

    # ------------------------------------------------------------------ eviction

    def device_leaves(self) -> list[TreeNode]:
        """Unlocked nodes with device pages and no child holding device pages."""
        return [
            n
            for n in self.nodes()
            if n.pages is not None
            and n.lock_ref == 0
            and not any(c.pages is not None for c in n.children.values())
        ]

    def lru_device_victims(self, num_pages: int) -> Iterator[TreeNode]:
        """Yield unlocked device-resident leaves, least recently used first, until `num_pages`
        pages were offered; the caller must drop each yielded node's device pages (`drop_device`
        or `remove`) before asking for the next. The last node is split so that no more than
        `num_pages` pages are offered."""
        heap = [(n.last_access, id(n), n) for n in self.device_leaves()]
        heapq.heapify(heap)
        left = num_pages
        while left > 0 and heap:
            _, _, node = heapq.heappop(heap)
            if node.num_pages > left:
                self.split(node, node.num_pages - left)
            parent = node.parent
            left -= node.num_pages
            yield node
            if (
                parent is not self.root
                and parent.pages is not None
                and parent.lock_ref == 0
                and not any(c.pages is not None for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def drop_device(self, node: TreeNode) -> list[int]:
        """Take an unlocked node's device pages away, keeping the node (its host copy)."""
        pages, node.pages = node.pages or [], None
        self.device_pages -= len(pages)
        self.evictable_pages -= len(pages)
        return pages

    def remove(self, node: TreeNode) -> list[TreeNode]:
        """Remove an unlocked node and its subtree; return the removed nodes (their pages are
        the caller's to free)."""
        del node.parent.children[node.key[: self.page_size]]
        removed = list(self._subtree(node))
        for n in removed:
            if n.pages is not None:
                self.device_pages -= len(n.pages)
                self.evictable_pages -= len(n.pages)
        return removed

    # ------------------------------------------------------------------ walking

    def nodes(self) -> Iterator[TreeNode]:
        """Every node but the root."""
        for child in list(self.root.children.values()):
            yield from self._subtree(child)

    def _subtree(self, node: TreeNode) -> Iterator[TreeNode]:
        stack = [node]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
