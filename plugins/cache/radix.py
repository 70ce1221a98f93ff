"""The radix KV cache: pages of shared prefixes are reused across requests (SGLang's
RadixAttention, page-granular)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.plugins.cache.paged import (
    DEFAULT_PAGE_SIZE,
    KVState,
    PagedCache,
    page_table_counts,
)
from pegboard.plugins.cache.radix_tree import Match, RadixTree, TreeNode
from pegboard.sdk.slots import KVCache, Plugin, PluginContext
from pegboard.sdk.types import KVPool, Request


class RadixOptions(pydantic.BaseModel):
    """Options of `RadixCache`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    max_tokens: int | None = pydantic.Field(
        None,
        ge=0,
        description=(
            "Most tokens the tree keeps for reuse while no request uses them (unlocked pages); "
            "least recently used ones beyond it are evicted at once. None: the whole pool."
        ),
    )


@dataclass
class _Hold:
    """A request's claim on the tree: it locks `node`, and its first `num_pages` page-table
    entries are the tree pages of the path to `node`."""

    node: TreeNode
    num_pages: int


@dataclass
class RadixState:
    """What a radix cache hands a radix successor in a runtime swap: everything, tree too."""

    pool: KVPool
    free_pages: list[int]
    refs: list[int]
    cached: bytearray
    tree: RadixTree
    holds: dict[str, _Hold]
    adopted: set[int]


class RadixCache(KVCache):
    """A page pool whose full pages are indexed by a radix tree over token ids, so requests
    that share a prefix share its KV pages.

    - `match_prefix(r)` — the longest run of whole pages of `r.token_ids` in the tree, never
      the whole sequence (at least one token is left to compute). Query only.
    - `allocate_kv` — a new admission (`num_computed_tokens == 0`, empty page table) first
      claims its match: the tree pages go to the front of `page_table`, `num_computed_tokens`
      and `num_cached_tokens` become the hit length and the matched node is locked. Then pages
      are appended, taken from the free list or, when it runs short, by evicting the least
      recently used unlocked pages of the tree. A request that cannot get its pages is
      returned unchanged (a new admission gives its claim back).
    - `commit(requests)` — after a forward pass, each request's full computed pages go into
      the tree (so a concurrent request can hit them). Where the tree already held those
      tokens (another request inserted them first), the request switches to the tree's page
      and its duplicate is freed.
    - `free(r)` — inserts the request's full computed pages, unlocks its node and drops its
      page references: pages in the tree stay cached (evictable), the others (a partial last
      page, duplicates) return to the free list. Idempotent.
    - `num_free_pages` — free pages plus the pages of unlocked tree nodes (evictable).
    - `pages_needed(r, n)` — for a running request, the pages to append; for a new admission,
      the pages it takes out of `num_free_pages`: new pages for its `n` tokens after the hit,
      plus the matched pages that are evictable now (claiming them locks them).

    Page ownership: every page is free, or in the tree, or named by request page tables
    (`refs[p]` of them) — never free and referenced. A page named by several page tables is
    a tree page on each holder's locked path. `check_invariants` checks all of this.

    Runtime swap (handoff "state"): from another `RadixCache` with the same page size the
    whole state is adopted, tree included; from a predecessor with `export_state()` (e.g.
    `paged`) its pool and page references are adopted and the tree starts empty (requests'
    pages enter it at their next `commit`). `export_state()` gives a successor such as `paged`
    the pool, the page references and the unused tree pages as reusable.

    `stats()`: `prefix_hit_tokens` and `prefix_query_tokens` (tokens claimed from the tree and
    tokens of the requests admitted, cumulative), `evicted_pages`, `cached_pages`
    (pages in the tree) and the pool's page counts.
    """

    name = "radix"
    handoff = "state"
    Options: ClassVar[type[pydantic.BaseModel]] = RadixOptions

    # ------------------------------------------------------------------ setup and handoff

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        self.page_size = int(ctx.engine.get("page_size") or DEFAULT_PAGE_SIZE)
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evicted_pages = 0
        if isinstance(previous, RadixCache) and previous.page_size == self.page_size:
            self._adopt(previous.export_radix_state())
            return
        sizing = PagedCache()
        sizing.setup(ctx, previous)
        self.import_state(sizing.export_state())

    def _adopt(self, state: RadixState) -> None:
        self.pool = state.pool
        self._free = state.free_pages
        self._refs = state.refs
        self._cached = state.cached
        self.tree = state.tree
        self._holds = state.holds
        self._adopted = state.adopted

    def import_state(self, state: KVState) -> None:
        """Adopt a predecessor's pool and page references; its reusable pages become free and
        the tree starts empty."""
        self.pool = state.pool
        self.page_size = state.pool.page_size
        self._refs = list(state.refs)
        self._free = list(state.reusable_pages) + list(state.free_pages)
        self._cached = bytearray(self.pool.num_pages)  # 1: the page is a tree node's
        self.tree = RadixTree(self.page_size)
        self._holds: dict[str, _Hold] = {}
        # Pages requests held at the handoff: their holders have no tree lock on them until
        # they commit, so such a page may be shared outside the tree or be an unlocked tree
        # page meanwhile. A page leaves the set when its last holder lets go.
        self._adopted = {p for p, n in enumerate(self._refs) if n > 0}

    def export_state(self) -> KVState:
        """The pool and page references for a successor without a tree; tree pages no
        request holds are reusable."""
        reusable = [p for p, c in enumerate(self._cached) if c and self._refs[p] == 0]
        return KVState(self.pool, list(self._free), list(self._refs), reusable)

    def export_radix_state(self) -> RadixState:
        """Everything, for a radix successor."""
        return RadixState(
            self.pool,
            self._free,
            self._refs,
            self._cached,
            self.tree,
            self._holds,
            self._adopted,
        )

    # ------------------------------------------------------------------ queries

    def _matchable(self, request: Request) -> list[int]:
        """The tokens a hit may cover: whole pages, leaving at least one token to compute."""
        n = (request.num_tokens - 1) // self.page_size * self.page_size
        return request.token_ids[:n]

    def match_prefix(self, request: Request) -> int:
        return self.tree.match(self._matchable(request)).num_pages * self.page_size

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        ps = self.page_size
        if request.num_computed_tokens == 0 and not request.page_table:
            match = self.tree.match(self._matchable(request))
            hit = match.num_pages * ps
            return -(-(hit + num_new_tokens) // ps) - _locked_device_pages(match)
        tokens = request.num_computed_tokens + num_new_tokens
        return max(-(-tokens // ps) - len(request.page_table), 0)

    @property
    def num_free_pages(self) -> int:
        return len(self._free) + self.tree.evictable_pages

    def stats(self) -> dict[str, float]:
        return {
            "kv_pages_total": self.num_pages,
            "kv_pages_used": self.num_pages - self.num_free_pages,
            "kv_pages_free": self.num_free_pages,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_query_tokens": self.query_tokens,
            "evicted_pages": self.evicted_pages,
            "cached_pages": self.tree.device_pages,
        }

    # ------------------------------------------------------------------ allocation

    @hookimpl
    def allocate_kv(self, scheduled: list[Request], num_tokens: list[int]) -> list[Request]:
        # Claim every new admission's prefix first, so no allocation below evicts it.
        claimed = set()
        for r, n in zip(scheduled, num_tokens):
            if r.num_computed_tokens == 0 and not r.page_table:
                self._claim(r, n)
                claimed.add(id(r))
        failed = []
        for r, n in zip(scheduled, num_tokens):
            tokens = r.num_computed_tokens + n
            need = max(-(-tokens // self.page_size) - len(r.page_table), 0)
            pages = self._take(need)
            if pages is None:
                failed.append(r)
                if id(r) in claimed:
                    self._unclaim(r)
                continue
            for p in pages:
                self._refs[p] += 1
            r.page_table.extend(pages)
        failed_ids = {id(r) for r in failed}
        for r in scheduled:
            if id(r) in claimed and id(r) not in failed_ids:
                self.query_tokens += r.num_tokens
                self.hit_tokens += r.num_cached_tokens
        return failed

    def _claim(self, request: Request, num_tokens: int) -> None:
        """Lock the request's cached prefix and put its pages at the front of `page_table`.

        The hit is capped so that the scheduled tokens still fit after it (the tree may have
        grown since `schedule`, when preempted requests' pages were inserted)."""
        ps = self.page_size
        limit = min(request.num_tokens - num_tokens, request.num_tokens - 1) // ps * ps
        match = self.tree.match(request.token_ids[:limit], split=True, touch=True)
        nodes = self._claimable(match.nodes)
        request.num_cached_tokens = 0
        if not nodes:
            return
        self.tree.lock(nodes[-1])
        pages = [p for n in nodes for p in n.pages]
        for p in pages:
            self._refs[p] += 1
        request.page_table = pages
        request.num_computed_tokens = request.num_cached_tokens = len(pages) * ps
        self._holds[request.request_id] = _Hold(nodes[-1], len(pages))

    def _claimable(self, nodes: list[TreeNode]) -> list[TreeNode]:
        """The matched nodes a claim takes: all of them here (every node is on the device)."""
        return nodes

    def _unclaim(self, request: Request) -> None:
        hold = self._holds.pop(request.request_id, None)
        if hold is not None:
            self.tree.unlock(hold.node)
        self._release_pages(request.page_table)
        request.page_table = []
        request.num_computed_tokens = request.num_cached_tokens = 0

    def _take(self, num_pages: int) -> list[int] | None:
        """`num_pages` free pages (evicting if needed), or None if the pool cannot give them."""
        if num_pages > len(self._free):
            self.evict(num_pages - len(self._free))
        if num_pages > len(self._free):
            return None
        pages = self._free[len(self._free) - num_pages :][::-1]
        del self._free[len(self._free) - num_pages :]
        return pages

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages (if that many are evictable) from the least recently
        used unlocked tree nodes; return the number freed."""
        freed = 0
        for node in self.tree.lru_device_victims(num_pages):
            freed += self._evict_node(node)
        self.evicted_pages += freed
        return freed

    def _evict_node(self, node: TreeNode) -> int:
        """Take a victim's device pages back to the free list; return how many."""
        pages = node.pages or []
        self.tree.remove(node)
        self._uncache(pages)
        return len(pages)

    def _uncache(self, pages: Iterable[int]) -> None:
        """Pages left the tree: those no request names are free again (a page adopted
        at a handoff may still be named)."""
        for p in pages:
            self._cached[p] = 0
            if self._refs[p] == 0:
                self._free.append(p)

    # ------------------------------------------------------------------ insertion and free

    def commit(self, requests: list[Request]) -> None:
        for r in requests:
            self._insert(r)
        self._enforce_max_tokens()

    def free(self, request: Request) -> None:
        if request.page_table:
            self._insert(request)
        hold = self._holds.pop(request.request_id, None)
        if hold is not None:
            self.tree.unlock(hold.node)
        self._release_pages(request.page_table)
        request.page_table = []
        self._enforce_max_tokens()

    def _insert(self, request: Request) -> None:
        """Put the request's full computed pages into the tree and lock where they end."""
        ps = self.page_size
        hold = self._holds.get(request.request_id)
        start = hold.num_pages if hold else 0
        full = min(request.num_computed_tokens // ps, len(request.page_table))
        if full <= start:
            return
        node, tree_pages, created = self.tree.insert(
            request.token_ids[start * ps : full * ps],
            request.page_table[start:full],
            start=hold.node if hold else None,
        )
        for i, page in enumerate(tree_pages, start):
            self._cached[page] = 1
            own = request.page_table[i]
            if page != own:
                request.page_table[i] = page
                self._refs[page] += 1
                self._release_pages([own])
        self.tree.lock(node)
        if hold is not None:
            self.tree.unlock(hold.node)
        self._holds[request.request_id] = _Hold(node, full)
        self._on_inserted(created)

    def _on_inserted(self, nodes: list[TreeNode]) -> None:
        """Called with the nodes an insertion created (a host tier backs them up)."""

    def _release_pages(self, pages: Iterable[int]) -> None:
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] < 0:
                raise ValueError(f"page {p} was released more often than it was held")
            if self._refs[p] == 0:
                self._adopted.discard(p)
                if not self._cached[p]:
                    self._free.append(p)

    def _enforce_max_tokens(self) -> None:
        cap = self.options.max_tokens
        if cap is None:
            return
        excess = self.tree.evictable_pages - cap // self.page_size
        if excess > 0:
            self.evict(excess)

    # ------------------------------------------------------------------ checking

    def check_invariants(self, requests: Iterable[Request]) -> None:
        """Raise AssertionError unless page ownership is consistent.

        `requests` must include every request holding pages. Checked: every page is free xor
        referenced (by the tree or by page tables), never free twice, never lost; `refs`
        equals the number of page tables naming each page; a page several requests hold is a
        tree page (or was adopted shared at a handoff); each request's locked node's path
        pages lead its page table; lock counts equal the holds below each node; the evictable
        and device page counters match the tree; page tables cover the computed tokens."""
        requests = list(requests)
        counts = page_table_counts(requests, self.page_size, self.num_pages)
        tree_pages: list[int] = []
        for n in self.tree.nodes():
            if n.pages is not None:
                tree_pages.extend(n.pages)
        in_tree = set(tree_pages)
        if len(in_tree) != len(tree_pages):
            raise AssertionError("a page is held by two tree nodes")
        if in_tree != {p for p, c in enumerate(self._cached) if c}:
            raise AssertionError("the tree-page markers do not match the tree")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for p in range(self.num_pages):
            referenced = counts[p] > 0 or p in in_tree
            if (p in free) == referenced:
                state = (
                    "free and referenced" if referenced else "neither free nor referenced (lost)"
                )
                raise AssertionError(f"page {p} is {state}")
        for p in range(self.num_pages):
            if counts[p] != self._refs[p]:
                raise AssertionError(
                    f"page {p}: {counts[p]} page tables name it, refcount {self._refs[p]}"
                )
            if counts[p] > 1 and p not in in_tree and p not in self._adopted:
                raise AssertionError(f"page {p} is held by {counts[p]} requests outside the tree")
        self._check_holds(requests)
        self._check_tree_counters()

    def _check_holds(self, requests: list[Request]) -> None:
        by_id = {r.request_id: r for r in requests}
        expected_locks: dict[int, int] = {}
        for request_id, hold in self._holds.items():
            r = by_id.get(request_id)
            if r is None:
                raise AssertionError(f"{request_id} holds a tree lock but is not given")
            path = hold.node.path()
            pages = [p for n in path for p in (n.pages or [])]
            if any(n.pages is None for n in path) or r.page_table[: hold.num_pages] != pages:
                raise AssertionError(f"{request_id}: page table does not start with its path")
            for n in path:
                expected_locks[id(n)] = expected_locks.get(id(n), 0) + 1
        for r in requests:
            hold = self._holds.get(r.request_id)
            tail = r.page_table[hold.num_pages if hold else 0 :]
            if any(self._cached[p] and p not in self._adopted for p in tail):
                raise AssertionError(f"{r.request_id} names a tree page outside its locked path")
        for n in self.tree.nodes():
            if n.lock_ref != expected_locks.get(id(n), 0):
                raise AssertionError(
                    f"node of {len(n.key)} tokens: lock_ref {n.lock_ref}, "
                    f"{expected_locks.get(id(n), 0)} holds below it"
                )

    def _check_tree_counters(self) -> None:
        device = evictable = 0
        for n in self.tree.nodes():
            if len(n.key) != n.num_pages * self.page_size:
                raise AssertionError(f"node of {len(n.key)} tokens holds {n.num_pages} pages")
            if n.pages is None:
                continue
            if n.parent is not self.tree.root and n.parent.pages is None:
                raise AssertionError("a device-resident node has a host-only parent")
            device += len(n.pages)
            if n.lock_ref == 0:
                evictable += len(n.pages)
        if (device, evictable) != (self.tree.device_pages, self.tree.evictable_pages):
            raise AssertionError(
                f"tree counters {self.tree.device_pages}/{self.tree.evictable_pages} pages "
                f"(device/evictable), actual {device}/{evictable}"
            )


def _locked_device_pages(match: Match) -> int:
    """Matched pages that cost nothing to claim: on the device and locked already."""
    total, left = 0, match.num_pages
    for n in match.nodes:
        k = min(n.num_pages, left)
        left -= k
        if n.lock_ref > 0 and n.pages is not None:
            total += k
    return total
