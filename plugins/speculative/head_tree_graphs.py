"""CUDA graphs of an EAGLE head's tree drafting (EAGLE-2, `topk` K > 1, depth D): a whole
`propose` of up to B requests in one replay, with the tree search on the device.

The replay runs what `eagle.EagleSpeculator._trees` runs, for every request at once:

1. the catch-up forward (`head_graphs.Feed`: at most `D + 1` new pairs per request, padded),
   whose last row per request gives the K best first tokens (depth 1, all expanded);
2. depths 2 .. D: one head step over each request's K frontier nodes (entries `real + (d-2)K
   ...`, rotary position `last + d - 1`, a `[K, (d-1)K]` tree mask over the head's draft
   entries: ancestors and itself), whose K best children each are the depth's `K * K`
   candidates; the next frontier is the greedy chain's node (the spine's first child) plus the
   K - 1 best-scoring other candidates, in candidate order (`tree_search.DraftTree.frontier`:
   scores are float64 sums of log-probabilities, ties broken by order, as Python's stable
   sort does).

The tree masks are computed in the graph (a frontier node's row is its parent's row plus its
own entry) and written into each depth's Triton backend's fixed tree tensors (`max_tree`),
whose meta rows the host prepares. The host reads back, in one copy, every depth's children
(log-probabilities and ids) and frontier choice, rebuilds the `DraftTree` the eager path would
have built and cuts it to each request's limit (`DraftTree.drafts`): every request is drafted
to depth D, and a tree cut to `k < D` tokens is its spine's first `k` nodes either way.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pegboard.core.cuda_graph import capture_graph, capture_sizes, padded_size
from pegboard.plugins.speculative.head_graphs import Feed, _batch, _slots
from pegboard.plugins.speculative.head_kv import HeadKV, attention_backend
from pegboard.plugins.speculative.tree_search import DraftTree
from pegboard.sdk.device import to_device
from pegboard.sdk.types import Drafts

log = logging.getLogger("pegboard.speculative.eagle")


class TreeDraftGraphs:
    """A head's tree `propose` (catch-up forward + `depth - 1` frontier steps) per batch
    size (see the module docstring)."""

    def __init__(
        self, head, kv: HeadKV, topk: int, depth: int, max_batch_size: int, feature_size: int
    ) -> None:
        self.head, self.kv, self.topk, self.depth = head, kv, topk, depth
        self.q = depth + 1  # what a verify leaves: the accepted path and the target's token
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = n = self.sizes[-1]
        dev, K = kv.device, topk
        info = kv.attention.model
        self.max_model_len = info.max_model_len
        self.feed = Feed(kv, self.q, n, feature_size)
        self.backends = []
        for d in range(2, depth + 1):
            backend = attention_backend("triton", info, kv.pool)
            backend.prepare_for_capture(n, max_query_len=K, max_tree=(d - 1) * K)
            self.backends.append(backend)
        steps = max(depth - 1, 0)
        self.positions = torch.zeros(steps, n * K, dtype=torch.int64, device=dev)
        self.slots = torch.full((steps, n * K), -1, dtype=torch.int64, device=dev)
        # Outputs: depth 1's K children, then per depth 2..D the frontier's K children each
        # and (depths 2..D-1) the chosen frontier, as candidate indices.
        self.values = torch.zeros(n, K + steps * K * K, dtype=torch.float32, device=dev)
        self.ids = torch.zeros(n, K + steps * K * K, dtype=torch.int64, device=dev)
        self.chosen = torch.zeros(n, max(steps - 1, 0) * K, dtype=torch.int64, device=dev)
        # Device constants of the graph: a Python value written into a device tensor inside
        # a capture (`x[index] = 1`: index_put_ with a CPU scalar) is a host-to-device copy,
        # which a capture refuses.
        self.eye = torch.eye(K, dtype=torch.int8, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        self._capture_all()

    def can_run(self, jobs) -> bool:
        """Whether `jobs` fit a graph: few enough, each at most `depth + 1` new pairs, and
        their padded entries within the page table."""
        extra = self.topk * (self.depth - 1)
        return len(jobs) <= self.max_batch_size and all(
            len(j.ids) <= self.q and j.slot.real + self.q + extra <= self.max_model_len
            for j in jobs
        )

    def run(self, jobs, limits: list[int]) -> list[Drafts]:
        """Each job's draft tree of at most `limits[i]` tokens. The jobs' head KV must have
        room for their new pairs and `topk * (depth - 1)` draft entries; the caller advances
        their slots as after an eager catch-up."""
        n, K, ps = len(jobs), self.topk, self.kv.page_size
        size = padded_size(n, self.sizes)
        arrays, lens = self.feed.host_inputs(jobs, size)
        steps = self.depth - 1
        positions = np.zeros((steps, size * K), np.int64)
        slots = np.full((steps, size * K), -1, np.int64)
        for i, (j, m) in enumerate(zip(jobs, lens)):
            real = j.slot.real + m
            for s in range(steps):  # depth d = s + 2 feeds the frontier of depth s + 1
                positions[s, i * K : (i + 1) * K] = j.positions[-1] + s + 1
                slots[s, i * K : (i + 1) * K] = _slots(j.slot, real + s * K, K, ps)
        arrays += [positions.ravel(), slots.ravel()]
        parts = torch.split(to_device(np.concatenate(arrays), self.kv.device),
                            [len(a) for a in arrays])  # fmt: skip
        self.feed.load(jobs, parts, lens, size)
        self.positions[:, : size * K].copy_(parts[5].view(steps, size * K))
        self.slots[:, : size * K].copy_(parts[6].view(steps, size * K))
        for s, backend in enumerate(self.backends):
            seq_lens = [j.slot.real + m + (s + 1) * K for j, m in zip(jobs, lens)]
            backend.prepare(self._depth_batch(jobs, seq_lens, s, size))
        self.graphs[size].replay()
        self.num_replays += 1
        values = self.values[:n].tolist()
        ids = self.ids[:n].tolist()
        chosen = self.chosen[:n].tolist()
        return [self._tree(values[i], ids[i], chosen[i]).drafts(k) for i, k in enumerate(limits)]

    def _tree(self, values: list[float], ids: list[int], chosen: list[int]) -> DraftTree:
        """The `DraftTree` the eager path builds, from one request's graph outputs."""
        K = self.topk
        tree = DraftTree(K)
        frontier = tree.add_children(-1, values[:K], ids[:K])
        for s in range(self.depth - 1):
            new, at = [], K + s * K * K
            for p, f in enumerate(frontier):
                lo = at + p * K
                new += tree.add_children(f, values[lo : lo + K], ids[lo : lo + K])
            if s < self.depth - 2:  # `tree.frontier(new)`, as the graph chose it
                frontier = [new[c] for c in chosen[s * K : (s + 1) * K]]
        return tree

    def _depth_batch(self, jobs, seq_lens: list[int], s: int, size: int):
        """Depth `s + 2`'s head step as the graph's layout: per request K new entries and a
        `[K, (s+1)K]` tree mask (its bits written in the graph); padded requests over page 0."""
        K, ps, n = self.topk, self.kv.page_size, len(jobs)
        m = (s + 1) * K
        seq_lens = seq_lens + [m] * (size - n)
        tables = [j.slot.page_table[: -(-q // ps)] for j, q in zip(jobs, seq_lens)]
        tables += [[0] * -(-m // ps)] * (size - n)
        batch = _batch(self.slots[s, : size * K], [K] * size, seq_lens, tables)
        batch.tree_masks = [torch.ones(K, m, dtype=torch.bool)] * size
        return batch

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pages = -(-self.max_model_len // self.kv.page_size)
        self.pool = torch.cuda.graph_pool_handle() if self.ids.is_cuda else None
        for size in reversed(self.sizes):
            self.feed.prepare_capture(size, self.max_model_len, pages)
            for s, backend in enumerate(self.backends):
                batch = _batch(self.slots[s, : size * self.topk], [self.topk] * size,
                               [self.max_model_len] * size, [[0] * pages] * size)  # fmt: skip
                m = (s + 1) * self.topk
                batch.tree_masks = [torch.ones(self.topk, m, dtype=torch.bool)] * size
                backend.prepare(batch)
            self.graphs[size] = self._capture(size)
        if self.ids.is_cuda:
            torch.cuda.synchronize()
        log.info(
            "captured EAGLE tree drafting CUDA graphs (topk %d, depth %d) for %s",
            self.topk, self.depth, self.sizes,
        )  # fmt: skip

    def _capture(self, size: int):
        return capture_graph(self._steps, size, self.pool)

    def _steps(self, size: int) -> None:
        """The tree search on the device (see the module docstring)."""
        K, head = self.topk, self.head
        last = self.feed.run(head, size)  # [B, H]
        values, ids = head.draft_topk(last, K)  # [B, K]
        self.values[:size, :K].copy_(values)
        self.ids[:size, :K].copy_(ids)
        scores = values.double()  # the frontier's path scores
        tokens = ids
        inputs = last[:, None, :].expand(size, K, last.shape[-1])
        entries = K * (self.depth - 1)
        ancestors = torch.zeros(size, K, max(entries, K), dtype=torch.int8, device=last.device)
        ancestors[:, :, :K] = self.eye  # each frontier node sees itself
        spine = torch.zeros(size, dtype=torch.int64, device=last.device)  # its frontier position
        rows = torch.arange(size, device=last.device)
        for s, backend in enumerate(self.backends):
            m = (s + 1) * K
            backend.tree_static[1][: size * K * m].view(size, K, m).copy_(ancestors[:, :, :m])
            out = head.step(inputs.reshape(size * K, -1), tokens.reshape(-1),
                            self.positions[s, : size * K], backend, first=False)  # fmt: skip
            values, ids = head.draft_topk(out, K)  # [B * K, K]
            at = K + s * K * K
            self.values[:size, at : at + K * K].copy_(values.view(size, K * K))
            self.ids[:size, at : at + K * K].copy_(ids.view(size, K * K))
            if s == len(self.backends) - 1:
                break
            candidates = (scores[:, :, None] + values.double().view(size, K, K)).view(size, -1)
            first = spine * K  # the spine's first child: always in the frontier
            key = (-candidates).scatter(1, first[:, None], float("inf"))
            rest = torch.sort(key, dim=1, stable=True).indices[:, : K - 1]
            chosen = torch.sort(torch.cat([first[:, None], rest], dim=1), dim=1).values
            self.chosen[:size, s * K : (s + 1) * K].copy_(chosen)
            spine = (chosen < first[:, None]).sum(1)
            parents = chosen // K
            scores = candidates.gather(1, chosen)
            tokens = ids.view(size, K * K).gather(1, chosen)
            inputs = out.view(size, K, -1)[rows[:, None], parents]
            ancestors = ancestors[rows[:, None], parents]
            ancestors[:, :, m : m + K] = self.eye
