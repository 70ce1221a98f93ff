"""The paged KV cache: a pool of fixed-size pages and a free list, no prefix reuse."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.slots import KVCache, Plugin, PluginContext
from pegboard.sdk.types import KVPool, Request, kv_dtype, kv_layout

DEFAULT_PAGE_SIZE = 16
#: Batches of at most this many requests count their pages in Python, larger ones in numpy.
SMALL_BATCH = 8


@dataclass
class KVState:
    """A KV cache's allocations, as a successor adopts them in a runtime swap (handoff "state").

    The page tables stay on the requests; this is the rest. `refs[p]` is the number of request
    page tables that name page `p`. `free_pages` are the pages nobody holds, the next one to be
    allocated last. `reusable_pages` are pages a prefix cache keeps for reuse that no request
    holds; a successor without prefix reuse treats them as free. Every page of `pool` is in
    exactly one of `free_pages`, `reusable_pages`, or has `refs[p] > 0`.
    """

    pool: KVPool
    free_pages: list[int]
    refs: list[int]
    reusable_pages: list[int] = field(default_factory=list)


def page_table_counts(requests: Iterable[Request], page_size: int, num_pages: int) -> list[int]:
    """How many page tables name each page; raises AssertionError for a page outside the pool
    or a page table too short for its request's computed tokens (shared by the invariant
    checkers of the caches built on this one)."""
    counts = [0] * num_pages
    for r in requests:
        if r.page_table and len(r.page_table) * page_size < r.num_computed_tokens:
            raise AssertionError(
                f"{r.request_id}: {len(r.page_table)} pages cannot hold "
                f"{r.num_computed_tokens} computed tokens"
            )
        for p in r.page_table:
            if not 0 <= p < num_pages:
                raise AssertionError(f"{r.request_id}: page {p} is outside the pool")
            counts[p] += 1
    return counts


class PagedCache(KVCache):
    """A page pool with a free list: `allocate_kv` appends free pages to page tables, `free`
    returns them; `match_prefix` is always 0 (no prefix reuse).

    Sizing at `setup`: `page_size` from `ctx.engine["page_size"]` (default 16); the number of
    pages from `ctx.engine["kv_cache_tokens"]` (rounded up to whole pages), else
    `ctx.engine["kv_memory_bytes"] // (KVPool.bytes_per_token(model, dtype) * page_size)`; the
    storage dtype is `ctx.engine["kv_cache_dtype"]` (`auto`: the model's; `fp8_e4m3`: one
    byte per value, per-layer scales 1.0), so an FP8 pool holds twice the tokens of bf16; the
    value layout is `ctx.engine["kv_cache_layout"]` (`KVPool.v_layout`; `auto`: nhd).

    Runtime swap (handoff "state"): a predecessor with the same page size that has
    `export_state() -> KVState` is taken over — its pool, free list and page references — so
    the requests keep their page tables and KV; the new cache's sizing settings are then
    ignored. A predecessor that holds no pages is simply replaced. Anything else is refused
    (setup raises and the predecessor keeps serving).

    Page references are counted, so pages shared by several requests (handed over by a
    prefix cache) are freed only when the last of them lets go.
    """

    name = "paged"
    handoff = "state"

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        self.page_size = int(ctx.engine.get("page_size") or DEFAULT_PAGE_SIZE)
        state = self._state_of(previous)
        if state is not None:
            self.import_state(state)
            return
        if ctx.model is None:
            raise ValueError("the paged KV cache needs the model's shape to size its pool")
        num_pages = self._num_pages(ctx)
        dtype = _kv_dtype(ctx)
        layout = kv_layout(ctx.engine.get("kv_cache_layout"), dtype)
        self.pool = KVPool.allocate(
            ctx.model, num_pages, self.page_size, dtype=dtype, v_layout=layout
        )
        self._refs = [0] * num_pages
        # A stack: page 0 is handed out first.
        self._free = list(range(num_pages - 1, -1, -1))

    def _state_of(self, previous: Plugin | None) -> KVState | None:
        if previous is None:
            return None
        export = getattr(previous, "export_state", None)
        if callable(export) and previous.page_size == self.page_size:
            return export()
        if isinstance(previous, KVCache) and previous.num_free_pages == previous.num_pages:
            return None
        raise ValueError(
            f"cannot take over the KV of {previous.name or type(previous).__name__!r}: it "
            f"holds pages and offers no export_state() with page size {self.page_size}; "
            "swap when it is idle"
        )

    def _num_pages(self, ctx: PluginContext) -> int:
        tokens = ctx.engine.get("kv_cache_tokens")
        if tokens:
            return -(-int(tokens) // self.page_size)
        memory = ctx.engine.get("kv_memory_bytes")
        if memory is None:
            raise ValueError("size the KV cache with kv_cache_tokens or kv_memory_bytes")
        page_bytes = KVPool.bytes_per_token(ctx.model, _kv_dtype(ctx)) * self.page_size
        num_pages = int(memory) // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"{memory} bytes of KV memory hold no page of {self.page_size} tokens "
                f"({page_bytes} bytes); raise the memory or lower page_size"
            )
        return num_pages

    # ------------------------------------------------------------------ handoff

    def export_state(self) -> KVState:
        """This cache's allocations, for a successor to adopt (see `KVState`)."""
        return KVState(self.pool, list(self._free), list(self._refs))

    def import_state(self, state: KVState) -> None:
        """Adopt a predecessor's pool and allocations; reusable pages become free."""
        self.pool = state.pool
        self.page_size = state.pool.page_size
        self._refs = list(state.refs)
        self._free = list(state.reusable_pages) + list(state.free_pages)

    # ------------------------------------------------------------------ queries

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        tokens = request.num_computed_tokens + num_new_tokens
        return max(-(-tokens // self.page_size) - len(request.page_table), 0)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def stats(self) -> dict[str, float]:
        return {
            "kv_pages_total": self.num_pages,
            "kv_pages_used": self.num_pages - len(self._free),
            "kv_pages_free": len(self._free),
        }

    # ------------------------------------------------------------------ allocation

    @hookimpl
    def allocate_kv(self, scheduled: list[Request], num_tokens: list[int]) -> list[Request]:
        failed = []
        free, refs = self._free, self._refs
        for i, k in self._needs(scheduled, num_tokens):
            r = scheduled[i]
            if k > len(free):
                failed.append(r)
                continue
            pages = free[len(free) - k :][::-1]
            del free[len(free) - k :]
            for p in pages:
                refs[p] += 1
            r.page_table.extend(pages)
        return failed

    def _needs(self, scheduled: list[Request], num_tokens: list[int]) -> list[tuple[int, int]]:
        """(index, pages) of each request that needs pages; a new admission's
        `num_cached_tokens` set to 0 (no prefix reuse: no hit)."""
        n = len(scheduled)
        if n <= SMALL_BATCH:  # (a few requests: Python beats numpy's per-call cost)
            need = list(map(self.pages_needed, scheduled, num_tokens))
            for r in scheduled:
                if r.num_computed_tokens == 0 and not r.page_table:
                    r.num_cached_tokens = 0
            return [(i, k) for i, k in enumerate(need) if k]
        # The whole batch in numpy (a decode step: a page every `page_size` steps per request);
        # only the requests that need some are visited.
        starts = np.fromiter([r.num_computed_tokens for r in scheduled], np.int64, n)
        held = np.fromiter([len(r.page_table) for r in scheduled], np.int64, n)
        if type(self).pages_needed is PagedCache.pages_needed:
            tokens = starts + np.asarray(num_tokens, dtype=np.int64)
            need = np.maximum(-(-tokens // self.page_size) - held, 0)
        else:  # a subclass counts its own way
            need = np.fromiter(map(self.pages_needed, scheduled, num_tokens), np.int64, n)
        for i in np.flatnonzero((starts == 0) & (held == 0)).tolist():
            scheduled[i].num_cached_tokens = 0
        return [(i, int(need[i])) for i in np.flatnonzero(need).tolist()]

    def free(self, request: Request) -> None:
        unheld = [p for p in request.page_table if self._refs[p] <= 0]
        if unheld:
            raise ValueError(
                f"request {request.request_id!r} names pages this cache did not give it: {unheld}"
            )
        for p in reversed(request.page_table):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
        request.page_table = []

    # ------------------------------------------------------------------ checking

    def check_invariants(self, requests: Iterable[Request], shared_ok: bool = False) -> None:
        """Raise AssertionError unless every page is free xor held, reference counts match the
        page tables, and a request holding pages has enough for its computed tokens.

        `requests` must include every request holding pages. A page named by two page tables
        is an error unless `shared_ok` (pages a prefix cache handed over may be shared)."""
        counts = page_table_counts(requests, self.page_size, self.num_pages)
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for p, (held, refs) in enumerate(zip(counts, self._refs)):
            if (p in free) == (held > 0):
                state = "free and held" if held else "neither free nor held (lost)"
                raise AssertionError(f"page {p} is {state}")
            if held != refs:
                raise AssertionError(f"page {p}: {held} page tables name it, refcount {refs}")
            if held > 1 and not shared_ok:
                raise AssertionError(f"page {p} is held by {held} requests")


def _kv_dtype(ctx: PluginContext) -> torch.dtype:
    return kv_dtype(ctx.engine.get("kv_cache_dtype"), ctx.model.dtype)
