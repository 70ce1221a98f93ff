"""Growing a draft tree EAGLE-2's way, for the speculators that draft with a model (`eagle`,
`draft`): best-first by the draft's confidence, with the greedy chain kept.

A node's score is the sum of the draft's log-probabilities along its path. The model proposes
its `topk` best tokens after the context (depth 1); then, per depth, the `topk` best-scoring
nodes of the last depth (the frontier) are run through the model and each gets its `topk`
best children. At the end the `limit` best-scoring nodes whose parents are kept form the tree,
each node's children by score. The greedy chain (the top-1 child of the top-1 child ...) is
always in the frontier and in the tree, so the tree's first path is what the speculator would
have drafted as a chain: a tree never guesses worse than the chain.
"""

from __future__ import annotations

import torch
from pegboard.sdk.types import Drafts


class DraftTree:
    """A draft tree under construction (see the module docstring)."""

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.depths: list[int] = []
        self.spine: list[int] = []  # the greedy chain's nodes, one per depth

    def add_children(self, parent: int, logprobs: list[float], ids: list[int]) -> list[int]:
        """Add `parent`'s children (`ids` by decreasing `logprobs`, as `topk` returns them);
        -1: the children of the request's last token. Returns their node indices."""
        base = self.scores[parent] if parent >= 0 else 0.0
        depth = self.depths[parent] + 1 if parent >= 0 else 1
        start = len(self.tokens)
        self.tokens.extend(ids)
        self.parents.extend([parent] * len(ids))
        self.scores.extend(base + lp for lp in logprobs)
        self.depths.extend([depth] * len(ids))
        if ids and (parent == -1 and not self.spine or self.spine and parent == self.spine[-1]):
            self.spine.append(start)
        return list(range(start, start + len(ids)))

    def frontier(self, candidates: list[int]) -> list[int]:
        """The `topk` best-scoring of `candidates` (one depth's new nodes) to expand next, the
        greedy chain's node among them."""
        spine = [i for i in candidates if self.spine and i == self.spine[-1]]
        rest = sorted((i for i in candidates if i not in spine), key=lambda i: -self.scores[i])
        return sorted(spine + rest[: self.topk - len(spine)])

    def ancestor_mask(self, fed: list[int], frontier: list[int]) -> torch.Tensor:
        """`[len(frontier), len(fed) + len(frontier)]`: which of the draft model's tree entries
        (the `fed` nodes, then the `frontier` being fed) each frontier node sees: its
        ancestors and itself."""
        col = {node: j for j, node in enumerate(fed + frontier)}
        mask = torch.zeros(len(frontier), len(col), dtype=torch.bool)
        for j, f in enumerate(frontier):
            a = f
            while a >= 0:
                mask[j, col[a]] = True
                a = self.parents[a]
        return mask

    def drafts(self, limit: int) -> Drafts:
        """The tree of at most `limit` nodes: the greedy chain, then the best-scoring nodes
        whose parents are kept; parents first (by depth), each node's children by score."""
        kept = set(self.spine[:limit])
        for i in sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], self.depths[i])):
            if len(kept) >= limit:
                break
            if self.parents[i] < 0 or self.parents[i] in kept:
                kept.add(i)
        order = sorted(kept, key=lambda i: (self.depths[i], -self.scores[i], i))
        index = {old: new for new, old in enumerate(order)}
        return Drafts(
            [self.tokens[i] for i in order],
            parents=[index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in order],
        )
