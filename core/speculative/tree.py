"""Draft trees: their shape (depths, ancestor masks, first path) and the KV compaction that
moves an accepted path's keys and values into place.

A tree of k draft tokens is laid out flat after the request's last token, in the order the
speculator gave (`Drafts.parents[i] < i`): token `i` takes the KV slot of sequence index
`P + 1 + i` (P: the last token's index) and the rotary position `P + depth(i)`; it attends to
the context up to the last token, its ancestors and itself (`ancestor_mask`). After the verify
the accepted path's tokens sit at slots `P + 1 + path[j]`; `compact_kv` copies them to
`P + 1 + j`, where the next step's attention expects them. A chain is the tree whose token
`i` has parent `i - 1`: its accepted path is `0, 1, ...` and needs no copy.
"""

from __future__ import annotations

import functools

import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import KVPool, Request


def chain_parents(k: int) -> list[int]:
    return list(range(-1, k - 1))


def depths(parents: list[int]) -> list[int]:
    """Depth of each draft token (1 for a child of the request's last token)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def children(parents: list[int]) -> list[list[int]]:
    """Per node (index 0: the request's last token, `1 + i`: draft token i), its children's
    draft indices, in draft order (the first child first)."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        out[p + 1].append(i)
    return out


def first_path(parents: list[int]) -> list[int]:
    """The draft indices of the path that follows every node's first child: the tree's main
    guess (what a chain speculator would have proposed)."""
    kids = children(parents)
    path, node = [], 0
    while kids[node]:
        i = kids[node][0]
        path.append(i)
        node = i + 1
    return path


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """`[k, k]` bool: entry `[i, j]` is True when draft `j` is draft `i` or an ancestor of it.
    Kept per tree shape (a speculator repeats a few): callers must not change it."""
    return _ancestor_mask(tuple(parents))


@functools.lru_cache(maxsize=256)
def _ancestor_mask(parents: tuple[int, ...]) -> torch.Tensor:
    k = len(parents)
    mask = torch.eye(k, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def is_chain(parents: list[int] | None) -> bool:
    return parents is None or all(p == i - 1 for i, p in enumerate(parents))


def compact_kv(pool: KVPool, moves: list[tuple[Request, int, list[int]]]) -> None:
    """Copy each accepted path's KV into place: per `(request, P, path)`, sequence index
    `P + 1 + path[j]` to `P + 1 + j` (entries already in place are skipped), in every layer."""
    src, dst = [], []
    ps = pool.page_size
    for r, last, path in moves:
        for j, node in enumerate(path):
            if node != j:
                a, b = last + 1 + node, last + 1 + j
                src.append(r.page_table[a // ps] * ps + a % ps)
                dst.append(r.page_table[b // ps] * ps + b % ps)
    if not src:
        return
    both = to_device(src + dst, pool.k[0].device, torch.int64)  # one pinned upload, no sync
    src_t, dst_t = both[: len(src)], both[len(src) :]
    for cache in (*pool.k, *pool.v):
        flat = cache.view(-1, *cache.shape[2:])
        if pool.is_fp8:  # CPU has no FP8 index ops: move the bytes
            flat = flat.view(torch.uint8)
        flat.index_copy_(0, dst_t, flat.index_select(0, src_t))
