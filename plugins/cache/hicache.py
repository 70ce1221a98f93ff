"""HiCache: the radix cache with a second tier in host memory (SGLang's hierarchical cache).

Pages the radix tree evicts from the device pool are kept in a host pool and copied back on a
hit instead of being recomputed."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import ClassVar, Literal

import pydantic
import torch
from pegboard.plugins.cache.radix import RadixCache, RadixOptions, RadixState
from pegboard.plugins.cache.radix_tree import TreeNode
from pegboard.sdk.slots import Plugin, PluginContext
from pegboard.sdk.types import KVPool, Request


class HiCacheOptions(RadixOptions):
    """Options of `HiCache`."""

    host_ratio: float = pydantic.Field(
        2.0,
        gt=0.0,
        le=16.0,  # a bound: a swap over HTTP must not be able to ask for all host memory
        description="Host pool size as a multiple of the device pool's pages.",
    )
    write_policy: Literal["write_through", "write_back"] = pydantic.Field(
        "write_through",
        description=(
            "write_through: copy pages to the host when they enter the tree (eviction is then "
            "free); write_back: copy them only when they are evicted from the device."
        ),
    )


class HiCache(RadixCache):
    """A `RadixCache` whose tree nodes may also live in a host pool (`self.host`, a `KVPool`
    on the CPU with `host_ratio` x the device pool's pages, pinned when the device is a GPU).

    - Evicting a node from the device copies its pages to the host first (unless a copy is
      already there: with `write_through` every node is copied when it enters the tree); the
      node stays in the tree as host-only, so `match_prefix` still reports its tokens.
    - Claiming a match that runs into host-only nodes loads them: device pages are allocated
      (possibly evicting other unlocked nodes), the host pages copied in, and the node is on
      the device again (its host copy stays). `pages_needed` counts these pages. If the device
      cannot give them, the claim stops at the last node that is on the device.
    - When the host pool runs short it drops, least recently used first, host copies of nodes
      that are also on the device and host-only leaves; a node that cannot get host pages is
      evicted without a copy (removed, as in `radix`). Nodes being claimed are never dropped.

    Host-only nodes are always below device-resident ones (a node on the device has its
    parent on the device). The outputs are those of `radix` and `paged`: KV is copied, never
    recomputed differently.

    Runtime swap: as `radix` for the device side; the host tier is not handed over (a
    successor, `hicache` included, starts with an empty host pool and the device tree).

    `stats()` adds `host_hit_tokens` (claimed tokens loaded from the host), `host_loaded_pages`,
    `host_backed_up_pages`, `host_evicted_pages` and the host pool's `host_pages_total` /
    `host_pages_used`.
    """

    name = "hicache"
    Options: ClassVar[type[pydantic.BaseModel]] = HiCacheOptions

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        super().setup(ctx, previous)
        num_host = max(int(self.num_pages * self.options.host_ratio), 1)
        self.host = _host_pool(self.pool, num_host)
        self._host_free = list(range(num_host - 1, -1, -1))
        self.host_hit_tokens = 0
        self.host_loaded_pages = 0
        self.host_backed_up_pages = 0
        self.host_evicted_pages = 0

    def export_radix_state(self) -> RadixState:
        """The device side only: host-only nodes are cut off and host copies forgotten."""
        for node in list(self.tree.nodes()):
            if node.pages is None and node.parent.pages is not None:
                self.tree.remove(node)
        for node in self.tree.nodes():
            node.host_pages = None
        self._host_free = list(range(self.host.num_pages - 1, -1, -1))
        return super().export_radix_state()

    def stats(self) -> dict[str, float]:
        return {
            **super().stats(),
            "host_hit_tokens": self.host_hit_tokens,
            "host_loaded_pages": self.host_loaded_pages,
            "host_backed_up_pages": self.host_backed_up_pages,
            "host_evicted_pages": self.host_evicted_pages,
            "host_pages_total": self.host.num_pages,
            "host_pages_used": self.host.num_pages - len(self._host_free),
        }

    # ------------------------------------------------------------------ device <- host

    def _claimable(self, nodes: list[TreeNode]) -> list[TreeNode]:
        if not nodes or nodes[-1].pages is not None:
            return nodes
        self.tree.lock(nodes[-1])  # the host-only tail must survive the evictions below
        usable = []
        for node in nodes:
            if node.pages is None and not self._load(node):
                break
            usable.append(node)
        self.tree.unlock(nodes[-1])
        return usable

    def _load(self, node: TreeNode) -> bool:
        pages = self._take(len(node.host_pages))
        if pages is None:
            return False
        _copy_pages(self.host, node.host_pages, self.pool, pages)
        self.tree.load(node, pages)
        for p in pages:
            self._cached[p] = 1
        self.host_loaded_pages += len(pages)
        self.host_hit_tokens += len(pages) * self.page_size
        return True

    # ------------------------------------------------------------------ device -> host

    def _on_inserted(self, nodes: list[TreeNode]) -> None:
        if self.options.write_policy == "write_through":
            for node in nodes:
                self._back_up(node)

    def _evict_node(self, node: TreeNode) -> int:
        if node.host_pages is None:
            self._back_up(node)
        if node.host_pages is None:
            removed = self.tree.remove(node)
            self._free_host(p for n in removed for p in n.host_pages or [])
            self._uncache(node.pages or [])
            return len(node.pages or [])
        pages = self.tree.drop_device(node)
        self._uncache(pages)
        return len(pages)

    def _back_up(self, node: TreeNode) -> None:
        """Copy a device node's pages to the host, if the host pool can give the pages."""
        host_pages = self._take_host(len(node.pages), keep=node)
        if host_pages is None:
            return
        _copy_pages(self.pool, node.pages, self.host, host_pages)
        node.host_pages = host_pages
        self.host_backed_up_pages += len(host_pages)

    def _take_host(self, num_pages: int, keep: TreeNode) -> list[int] | None:
        if num_pages > len(self._host_free):
            self._evict_host(num_pages - len(self._host_free), keep)
        if num_pages > len(self._host_free):
            return None
        pages = self._host_free[len(self._host_free) - num_pages :][::-1]
        del self._host_free[len(self._host_free) - num_pages :]
        return pages

    def _evict_host(self, num_pages: int, keep: TreeNode) -> None:
        """Free host pages, least recently used first: drop host copies of nodes that are on
        the device, remove host-only leaves. Locked nodes and `keep`'s path are spared."""
        spared = {id(n) for n in keep.path()}
        heap = [
            (n.last_access, id(n), n)
            for n in self.tree.nodes()
            if self._host_evictable(n) and id(n) not in spared
        ]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            host_pages, node.host_pages = node.host_pages, None
            freed += len(host_pages)
            self.host_evicted_pages += len(host_pages)
            self._free_host(host_pages)
            if node.pages is None:
                parent = node.parent
                self.tree.remove(node)
                if (
                    parent is not self.tree.root
                    and self._host_evictable(parent)
                    and id(parent) not in spared
                ):
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _host_evictable(self, node: TreeNode) -> bool:
        if node.host_pages is None or node.lock_ref > 0:
            return False
        return node.pages is not None or not node.children

    def _free_host(self, pages: Iterable[int]) -> None:
        self._host_free.extend(pages)

    # ------------------------------------------------------------------ checking

    def check_invariants(self, requests: Iterable[Request]) -> None:
        """`RadixCache.check_invariants`, plus: every host page is free xor held by exactly one
        node, and host-only nodes are unlocked."""
        super().check_invariants(requests)
        held: list[int] = []
        for n in self.tree.nodes():
            if n.host_pages is not None:
                held.extend(n.host_pages)
            elif n.pages is None:
                raise AssertionError("a tree node has neither device nor host pages")
            if n.pages is None and n.lock_ref > 0:
                raise AssertionError("a host-only node is locked")
        free = self._host_free
        if len(set(held)) != len(held):
            raise AssertionError("a host page is held by two nodes")
        if len(set(free)) != len(free):
            raise AssertionError("a host page is on the free list twice")
        if set(held) & set(free) or len(held) + len(free) != self.host.num_pages:
            raise AssertionError(
                f"host pages: {len(held)} held + {len(free)} free != {self.host.num_pages}"
            )


def _host_pool(device_pool: KVPool, num_pages: int) -> KVPool:
    """A pool shaped like `device_pool`, values in its layout too (`KVPool.v_layout`: pages
    then copy without a transpose), with `num_pages` pages in host memory."""
    template = device_pool.k[0]
    pin = template.is_cuda
    shape = (num_pages, *template.shape[1:])

    def new(shape=shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=template.dtype, device="cpu", pin_memory=pin)

    layers = len(device_pool.k)
    if device_pool.v_layout == "hdp":  # stored [pages, heads, head_dim, page_size]
        stored = (num_pages, *device_pool.stored_values()[0].shape[1:])
        values = [new(stored).permute(0, 3, 1, 2) for _ in range(layers)]
    else:
        values = [new() for _ in range(layers)]
    return KVPool(
        k=[new() for _ in range(layers)],
        v=values,
        page_size=device_pool.page_size,
        v_layout=device_pool.v_layout,
    )


def _copy_pages(src: KVPool, src_pages: list[int], dst: KVPool, dst_pages: list[int]) -> None:
    """Copy whole pages between pools of the same layout (device <-> host), every layer's keys
    and values, each page as one contiguous block (`KVPool.stored_values`)."""
    src_index = torch.tensor(src_pages, dtype=torch.long, device=src.k[0].device)
    dst_index = torch.tensor(dst_pages, dtype=torch.long, device=dst.k[0].device)
    for s, d in zip(src.k + src.stored_values(), dst.k + dst.stored_values()):
        if s.element_size() == 1:  # FP8 pages move as bytes (CPU has no FP8 index ops)
            s, d = s.view(torch.uint8), d.view(torch.uint8)
        d.index_copy_(0, dst_index, s.index_select(0, src_index).to(d.device, non_blocking=True))
