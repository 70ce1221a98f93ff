"""The paged KV cache: sizing, allocation, idempotent frees, invariants under random use, and
state handoff to a successor in a runtime swap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pegboard.plugins.cache.paged import KVState, PagedCache
from pegboard.sdk.slots import KVCache, PluginContext
from pegboard.sdk.types import KVPool, ModelInfo, Request, SamplingParams

PAGE = 4


def model_info() -> ModelInfo:
    return ModelInfo("tiny", 2, 2, 2, 8, 16, 32, 4096, torch.float32, torch.device("cpu"))


def context(**engine) -> PluginContext:
    return PluginContext(model_info(), engine={"page_size": PAGE, **engine})


def cache_of(num_pages: int = 8, previous: KVCache | None = None) -> PagedCache:
    cache = PagedCache()
    cache.setup(context(kv_cache_tokens=num_pages * PAGE), previous)
    return cache


def req(prompt_len: int) -> Request:
    return Request(list(range(prompt_len)), SamplingParams(max_tokens=4))


def advance(r: Request, n: int) -> None:
    """What the core does after a forward pass: the `n` scheduled tokens are computed."""
    r.num_computed_tokens += n


# ---------------------------------------------------------------------- sizing


def test_kv_cache_tokens_are_rounded_up_to_whole_pages():
    cache = PagedCache()
    cache.setup(context(kv_cache_tokens=33))
    assert cache.num_pages == 9 and cache.num_free_pages == 9
    assert cache.pool.k[0].shape == (9, PAGE, 2, 8)
    assert len(cache.pool.k) == len(cache.pool.v) == 2


def test_kv_memory_bytes_size_the_pool_when_no_token_count_is_given():
    page_bytes = KVPool.bytes_per_token(model_info()) * PAGE
    cache = PagedCache()
    cache.setup(context(kv_cache_tokens=None, kv_memory_bytes=5 * page_bytes + page_bytes // 2))
    assert cache.num_pages == 5


def test_page_size_defaults_to_16():
    cache = PagedCache()
    cache.setup(PluginContext(model_info(), engine={"kv_cache_tokens": 64}))
    assert cache.page_size == 16 and cache.num_pages == 4


def test_too_little_memory_for_one_page_is_a_clear_error():
    cache = PagedCache()
    with pytest.raises(ValueError, match="hold no page"):
        cache.setup(context(kv_memory_bytes=10))


# ---------------------------------------------------------------------- allocation


def test_allocation_covers_the_computed_and_new_tokens():
    cache = cache_of(8)
    r = req(10)
    assert cache.pages_needed(r, 10) == 3
    assert cache.allocate_kv([r], [10]) == []
    assert r.page_table == [0, 1, 2] and cache.num_free_pages == 5
    advance(r, 10)
    assert cache.pages_needed(r, 2) == 0  # tokens 10 and 11 fit in page 2
    assert cache.pages_needed(r, 3) == 1
    cache.allocate_kv([r], [3])
    assert len(r.page_table) == 4


def test_a_request_that_does_not_fit_is_returned_and_keeps_its_pages():
    cache = cache_of(4)
    big, small = req(8), req(4)
    cache.allocate_kv([big], [8])
    advance(big, 8)
    failed = cache.allocate_kv([big, small], [12, 4])
    assert failed == [big]
    assert big.page_table == [0, 1] and small.page_table == [2]


class CountingPagedCache(PagedCache):
    """Pages counted by a `pages_needed` override: `allocate_kv` asks it request by request."""

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        return super().pages_needed(request, num_new_tokens)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30), st.integers(1, 12)), max_size=8),
    st.integers(1, 12),
)
def test_batch_counted_pages_allocate_as_the_per_request_count(batch, num_pages):
    """The whole-batch count (numpy) hands out the same pages, and fails the same requests, as
    `pages_needed` asked request by request."""
    tables = []
    for cls in (PagedCache, CountingPagedCache):
        cache = cls()
        cache.setup(context(kv_cache_tokens=num_pages * PAGE))
        requests, tokens = [], []
        for prompt, computed, n in batch:
            r = req(prompt + computed)
            if computed:  # a running request: its computed tokens' pages, where they fit
                cache.allocate_kv([r], [computed])
                advance(r, computed)
            requests.append(r)
            tokens.append(min(n, r.num_uncomputed_tokens) or 1)
        failed = cache.allocate_kv(requests, tokens)
        tables.append(([r.page_table for r in requests], [requests.index(r) for r in failed]))
    assert tables[0] == tables[1]


def test_free_returns_every_page_and_is_idempotent():
    cache = cache_of(8)
    r = req(9)
    cache.allocate_kv([r], [9])
    cache.free(r)
    assert r.page_table == [] and cache.num_free_pages == 8
    cache.free(r)
    assert cache.num_free_pages == 8
    cache.check_invariants([r])


def test_freeing_pages_the_cache_never_gave_is_refused():
    cache = cache_of(8)
    r = req(4)
    r.page_table = [3]
    with pytest.raises(ValueError, match="did not give"):
        cache.free(r)


def test_usage_and_stats_count_pages():
    cache = cache_of(8)
    cache.allocate_kv([req(8)], [8])
    assert cache.usage() == pytest.approx(0.25)
    assert cache.stats() == {"kv_pages_total": 8, "kv_pages_used": 2, "kv_pages_free": 6}


def test_a_new_admission_has_no_cached_prefix():
    cache = cache_of(8)
    r = req(4)
    r.num_cached_tokens = 3  # left over from a previous admission elsewhere
    assert cache.match_prefix(r) == 0
    cache.allocate_kv([r], [4])
    assert r.num_cached_tokens == 0 and r.num_computed_tokens == 0


# ---------------------------------------------------------------------- invariants


def test_check_invariants_catches_a_lost_page_and_a_doubly_held_page():
    cache = cache_of(4)
    a, b = req(4), req(4)
    cache.allocate_kv([a, b], [4, 4])
    with pytest.raises(AssertionError, match="lost"):
        cache.check_invariants([a])
    b.page_table = list(a.page_table)
    with pytest.raises(AssertionError):
        cache.check_invariants([a, b])
    cache._free.append(a.page_table[0])
    with pytest.raises(AssertionError):
        cache.check_invariants([a])


operations = st.lists(
    st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(1, 23)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_invariants_hold_under_random_allocations_and_frees(ops):
    cache = cache_of(10)
    requests = [req(24) for _ in range(6)]
    for op, i, n in ops:
        r = requests[i]
        if op == "free":
            cache.free(r)
            r.num_computed_tokens = 0
            continue
        n = min(n, r.num_tokens - r.num_computed_tokens)
        if n == 0:
            continue
        free_before, held_before = cache.num_free_pages, list(r.page_table)
        if cache.allocate_kv([r], [n]):
            assert r.page_table == held_before and cache.num_free_pages == free_before
        else:
            advance(r, n)
        cache.check_invariants(requests)
        held = sum(len(q.page_table) for q in requests)
        assert held + cache.num_free_pages == cache.num_pages


# ---------------------------------------------------------------------- handoff


def test_a_successor_adopts_the_pool_and_every_page_table():
    old = cache_of(8)
    a, b = req(9), req(4)
    old.allocate_kv([a, b], [9, 4])
    advance(a, 9)
    advance(b, 4)
    tables = [list(a.page_table), list(b.page_table)]
    new = cache_of(100, previous=old)
    assert new.pool is old.pool and new.num_pages == 8
    assert [a.page_table, b.page_table] == tables
    new.check_invariants([a, b])
    c = req(8)
    new.allocate_kv([c, b], [8, 1])  # new pages never collide with adopted ones
    new.check_invariants([a, b, c])
    for r in (a, b, c):
        new.free(r)
    assert new.num_free_pages == 8


def test_handoff_keeps_shared_pages_until_the_last_holder_frees_them():
    pool = KVPool.allocate(model_info(), 4, PAGE)
    a, b = req(8), req(8)
    a.page_table, b.page_table = [0, 1], [0, 2]  # page 0 is a shared prefix
    a.num_computed_tokens = b.num_computed_tokens = 8

    class PrefixCache(KVCache):
        page_size = PAGE

        def export_state(self) -> KVState:
            return KVState(pool, free_pages=[], refs=[2, 1, 1, 0], reusable_pages=[3])

    new = cache_of(previous=PrefixCache())
    new.check_invariants([a, b], shared_ok=True)
    with pytest.raises(AssertionError, match="held by 2"):
        new.check_invariants([a, b])
    assert new.num_free_pages == 1  # the reusable page is free to a cache without reuse
    new.free(a)
    assert new.num_free_pages == 2
    new.free(b)
    assert new.num_free_pages == 4
    new.check_invariants([a, b])


def test_a_predecessor_with_another_page_size_holding_pages_is_refused():
    old = PagedCache()
    old.setup(PluginContext(model_info(), engine={"page_size": 8, "kv_cache_tokens": 64}))
    r = req(4)
    old.allocate_kv([r], [4])
    with pytest.raises(ValueError, match="page size 4"):
        cache_of(previous=old)
    old.free(r)
    fresh = cache_of(8, previous=old)
    assert fresh.pool is not old.pool and fresh.page_size == PAGE


@pytest.mark.parametrize("small_batch", [0, 64], ids=["numpy", "python"])
def test_small_and_large_batches_allocate_alike(monkeypatch, small_batch):
    """`allocate_kv` counts a few requests' pages in Python and many in numpy: the same pages,
    failures and `num_cached_tokens` resets either way."""
    from pegboard.plugins.cache import paged

    monkeypatch.setattr(paged, "SMALL_BATCH", small_batch)
    cache = cache_of(num_pages=12)
    running = [req(5), req(3), req(9)]
    cache.allocate_kv(running[:2], [5, 3])
    for r in running[:2]:
        advance(r, r.num_tokens)
    for r in running:
        r.num_cached_tokens = 7  # (reset only for a new admission: the third)
    running[0].token_ids.append(1)
    failed = cache.allocate_kv(running + [req(40)], [1 + 4, 1, 9, 40])
    assert [len(r.page_table) for r in running] == [3, 1, 3]
    assert [r.num_cached_tokens for r in running] == [7, 7, 0]
    assert len(failed) == 1 and failed[0].num_prompt_tokens == 40
