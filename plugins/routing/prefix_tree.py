"""An approximate radix tree of the request texts a worker was sent, for cache-aware routing.

It approximates the worker's prefix cache from the router's side: keys are characters of the
routing key (text, or token ids one character each), not the worker's tokens, and eviction is
least-recently-used by leaf once the tree holds more than `max_chars` characters.
"""

from __future__ import annotations

import itertools

_clock = itertools.count(1)


class _Node:
    __slots__ = ("children", "edge", "last_use", "parent")

    def __init__(self, edge: str, parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.last_use = next(_clock)


class PrefixTree:
    """Texts inserted so far, as a compressed trie; `chars` counts the characters stored."""

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.chars = 0

    def match(self, text: str) -> int:
        """How many leading characters of `text` the tree holds (marks the path as used)."""
        node, pos, now = self.root, 0, next(_clock)
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            child.last_use = now
            common = _common_length(child.edge, text, pos)
            pos += common
            if common < len(child.edge):
                break
            node = child
        return pos

    def insert(self, text: str) -> None:
        """Add `text`, splitting an edge where it diverges."""
        node, pos, now = self.root, 0, next(_clock)
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.last_use = now
                node.children[text[pos]] = leaf
                self.chars += len(leaf.edge)
                return
            child.last_use = now
            common = _common_length(child.edge, text, pos)
            if common < len(child.edge):  # split: node -> middle -> child
                middle = _Node(child.edge[:common], node)
                middle.last_use = now
                node.children[text[pos]] = middle
                child.edge = child.edge[common:]
                child.parent = middle
                middle.children[child.edge[0]] = child
                child = middle
            pos += common
            node = child

    def evict(self, max_chars: int) -> None:
        """Drop least recently used leaves until at most `max_chars` characters are stored."""
        while self.chars > max_chars:
            leaves = sorted(self._leaves(), key=lambda n: n.last_use)
            if not leaves:
                return
            for leaf in leaves:
                if self.chars <= max_chars:
                    return
                parent = leaf.parent
                del parent.children[leaf.edge[0]]
                self.chars -= len(leaf.edge)

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out


def _common_length(edge: str, text: str, pos: int) -> int:
    n = min(len(edge), len(text) - pos)
    if text.startswith(edge[:n], pos):
        return n
    lo, hi = 0, n  # binary search on the longest common prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo
