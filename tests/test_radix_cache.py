"""The radix KV cache without a model: prefix matching, claiming and locking, insertion at
commit and free, LRU eviction, the page invariant under random use, and state handoff."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pegboard.plugins.cache.paged import PagedCache
from pegboard.plugins.cache.radix import RadixCache, RadixOptions
from pegboard.sdk.slots import KVCache, PluginContext
from pegboard.sdk.types import ModelInfo, Request, SamplingParams

PAGE = 4


def model_info() -> ModelInfo:
    return ModelInfo("tiny", 2, 2, 2, 8, 16, 32, 4096, torch.float32, torch.device("cpu"))


def context(**engine) -> PluginContext:
    return PluginContext(model_info(), engine={"page_size": PAGE, **engine})


def cache_of(num_pages: int = 16, previous: KVCache | None = None, **options) -> RadixCache:
    cache = RadixCache(RadixOptions(**options))
    cache.setup(context(kv_cache_tokens=num_pages * PAGE), previous)
    return cache


def paged_of(num_pages: int = 16, previous: KVCache | None = None) -> PagedCache:
    cache = PagedCache()
    cache.setup(context(kv_cache_tokens=num_pages * PAGE), previous)
    return cache


def req(tokens: list[int]) -> Request:
    return Request(list(tokens), SamplingParams(max_tokens=4))


def run(cache: KVCache, r: Request, n: int | None = None) -> None:
    """What the engine does for one step of `r`: allocate, forward (tokens become computed),
    commit."""
    if n is None:
        n = r.num_tokens - (r.num_computed_tokens or cache.match_prefix(r))
    assert cache.allocate_kv([r], [n]) == []
    r.num_computed_tokens += n
    cache.commit([r])


PREFIX = list(range(100, 112))  # 3 pages


# ---------------------------------------------------------------------- matching and claims


def test_an_empty_cache_matches_nothing():
    cache = cache_of()
    assert cache.match_prefix(req(PREFIX + [1, 2])) == 0


def test_a_finished_requests_full_pages_are_matched_by_the_next_request():
    cache = cache_of()
    a = req(PREFIX + [1, 2])
    run(cache, a)
    cache.free(a)
    b = req(PREFIX + [7, 8, 9])
    assert cache.match_prefix(b) == 12
    assert cache.match_prefix(req(PREFIX[:6] + [5, 5, 5])) == 4  # page-granular: 1 whole page


def test_a_match_never_covers_the_whole_sequence():
    cache = cache_of()
    a = req(PREFIX + [1, 2, 3, 4])
    run(cache, a)
    cache.free(a)
    assert cache.match_prefix(req(PREFIX + [1, 2, 3, 4])) == 12  # 16 tokens cached, 15 usable
    assert cache.match_prefix(req(PREFIX)) == 8


def test_allocation_claims_the_match_and_locks_it():
    cache = cache_of(8)
    a = req(PREFIX + [1])
    run(cache, a)
    cache.free(a)
    b = req(PREFIX + [2, 3])
    assert cache.pages_needed(b, 2) == 1 + 3  # one new page, three matched pages now evictable
    free_before = cache.num_free_pages
    assert cache.allocate_kv([b], [2]) == []
    assert b.num_computed_tokens == b.num_cached_tokens == 12
    assert b.page_table[:3] == a_pages(cache, PREFIX) and len(b.page_table) == 4
    assert cache.num_free_pages == free_before - 4
    assert cache.evict(8) == 0  # everything cached is locked by b
    cache.check_invariants([b])


def a_pages(cache: RadixCache, tokens: list[int]) -> list[int]:
    """The tree's pages for `tokens` (whole pages)."""
    match = cache.tree.match(tokens)
    return [p for n in match.nodes for p in n.pages][: match.num_pages]


def test_running_requests_share_pages_committed_by_each_other():
    cache = cache_of()
    a = req(PREFIX + [1, 2])
    run(cache, a, 8)  # a chunk: two full pages enter the tree at commit
    b = req(PREFIX + [5])
    assert cache.match_prefix(b) == 8
    run(cache, b)
    assert b.page_table[:2] == a.page_table[:2] and b.num_cached_tokens == 8
    cache.check_invariants([a, b])
    cache.free(a)
    cache.free(b)
    cache.check_invariants([a, b])


def test_a_concurrently_computed_duplicate_is_replaced_by_the_tree_page_and_freed():
    cache = cache_of(16)
    a, b = req(PREFIX + [1]), req(PREFIX + [2])
    assert cache.allocate_kv([a, b], [13, 13]) == []  # both compute the prefix in one step
    a.num_computed_tokens = b.num_computed_tokens = 13
    free_before = cache.num_free_pages
    cache.commit([a, b])
    assert b.page_table[:3] == a.page_table[:3]
    assert cache.num_free_pages == free_before + 3  # b's duplicates were freed
    assert len(cache._free) == 16 - 8 + 3 and cache.tree.device_pages == 3
    cache.check_invariants([a, b])


def test_a_new_admission_that_does_not_fit_gives_its_claim_back():
    cache = cache_of(5)
    a = req(PREFIX + [1])
    run(cache, a)
    cache.free(a)
    hog = req(list(range(8)))
    run(cache, hog, 5)  # two pages, evicting the prefix's last page
    b = req(PREFIX + list(range(9)))
    assert cache.allocate_kv([b], [b.num_tokens - 8]) == [b]
    assert b.page_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    cache.check_invariants([hog, b])


# ---------------------------------------------------------------------- free and eviction


def test_free_keeps_full_pages_cached_and_returns_the_partial_page():
    cache = cache_of(8)
    a = req(PREFIX + [1, 2])
    run(cache, a)
    partial = a.page_table[3]
    cache.free(a)
    assert a.page_table == []
    assert cache._free[-1] == partial
    assert cache.tree.device_pages == 3 and cache.num_free_pages == 8
    assert cache.stats()["cached_pages"] == 3
    cache.free(a)  # idempotent
    cache.check_invariants([a])


def test_eviction_takes_the_least_recently_used_prefix_first():
    cache = cache_of(8)
    old, recent = req([1] * 8 + [0]), req([2] * 8 + [0])
    for r in (old, recent):
        run(cache, r)
        cache.free(r)
    hog = req(list(range(20)))
    run(cache, hog, 20)  # 5 pages: 4 free ones (the partial pages) + 1 evicted
    assert cache.match_prefix(req([1] * 8 + [0])) == 4  # old lost its last page
    assert cache.match_prefix(req([2] * 8 + [0])) == 8
    assert cache.stats()["evicted_pages"] == 1
    cache.check_invariants([hog])


def test_a_hit_refreshes_recency():
    cache = cache_of(8)
    old, recent = req([1] * 8 + [0]), req([2] * 8 + [0])
    for r in (old, recent):
        run(cache, r)
        cache.free(r)
    again = req([1] * 8 + [5])
    run(cache, again)
    cache.free(again)
    hog = req(list(range(24)))
    run(cache, hog, 24)
    assert cache.match_prefix(req([1] * 8 + [0])) == 8
    assert cache.match_prefix(req([2] * 8 + [0])) < 8


def test_max_tokens_caps_what_the_tree_keeps_unlocked():
    cache = cache_of(16, max_tokens=4)
    a = req(PREFIX + [1])
    run(cache, a)
    assert cache.tree.device_pages == 3  # locked by a: kept
    cache.free(a)
    assert cache.tree.device_pages == 1
    cache.check_invariants([a])


def test_stats_count_hits_and_queries_at_admission():
    cache = cache_of()
    a = req(PREFIX + [1])
    run(cache, a)
    cache.free(a)
    b = req(PREFIX + [2, 3])
    run(cache, b)
    stats = cache.stats()
    assert stats["prefix_query_tokens"] == 13 + 14
    assert stats["prefix_hit_tokens"] == 12


# ---------------------------------------------------------------------- invariants


def test_check_invariants_catches_lost_double_free_and_unshared_double_hold():
    cache = cache_of(8)
    a, b = req(PREFIX + [1]), req([9] * 5)
    run(cache, a)
    run(cache, b)
    with pytest.raises(AssertionError, match="lost"):
        cache.check_invariants([a])
    cache._free.append(a.page_table[3])
    with pytest.raises(AssertionError, match="free and referenced"):
        cache.check_invariants([a, b])
    cache._free.pop()
    b.page_table[1] = a.page_table[3]  # a private page named by two requests
    cache._refs[a.page_table[3]] += 1
    with pytest.raises(AssertionError):
        cache.check_invariants([a, b])


def test_check_invariants_catches_a_lock_count_that_does_not_match_the_holds():
    cache = cache_of(8)
    a = req(PREFIX + [1])
    run(cache, a)
    cache.tree.unlock(cache._holds[a.request_id].node)
    with pytest.raises(AssertionError):
        cache.check_invariants([a])


operations = st.lists(
    st.tuples(
        st.sampled_from(["step", "step", "free", "preempt"]),
        st.integers(0, 5),
        st.integers(1, 9),
    ),
    max_size=50,
)


@settings(max_examples=120, deadline=None)
@given(operations)
def test_invariants_hold_under_random_steps_frees_and_preemptions(ops):
    cache = cache_of(12)
    bases = [PREFIX, PREFIX[:8] + [7] * 4, [3] * 12]
    requests = [req(bases[i % 3] + [i, i + 1, i + 2]) for i in range(6)]
    for op, i, n in ops:
        r = requests[i]
        if op in ("free", "preempt"):
            cache.free(r)
            r.num_computed_tokens = 0
        else:
            start = r.num_computed_tokens or cache.match_prefix(r)
            n = min(n, r.num_tokens - start)
            if n == 0:
                r.token_ids.append(1)  # "sample" a token so a decode step has work
                continue
            table_before = list(r.page_table)
            failed = cache.allocate_kv([r], [n])
            if failed:
                assert r.page_table == table_before
            else:
                r.num_computed_tokens += n
                cache.commit([r])
        cache.check_invariants(requests)
        held = {p for q in requests for p in q.page_table}
        assert len(held) + cache.num_free_pages <= cache.num_pages
    for r in requests:
        cache.free(r)
    cache.check_invariants(requests)
    assert cache.num_free_pages == cache.num_pages


# ---------------------------------------------------------------------- handoff


def test_paged_to_radix_keeps_page_tables_and_inserts_them_at_commit():
    old = paged_of(8)
    a = req(PREFIX + [1])
    old.allocate_kv([a], [13])
    a.num_computed_tokens = 13
    table = list(a.page_table)
    new = cache_of(100, previous=old)
    assert new.pool is old.pool and a.page_table == table
    new.check_invariants([a])
    new.commit([a])
    assert new.match_prefix(req(PREFIX + [2])) == 12
    new.free(a)
    assert new.num_free_pages == 8
    new.check_invariants([a])


def test_radix_to_paged_hands_over_shared_pages_and_frees_cached_ones():
    old = cache_of(8)
    a, b = req(PREFIX + [1]), req(PREFIX + [2])
    run(old, a)
    run(old, b)
    c = req([5] * 9)
    run(old, c)
    old.free(c)  # two cached pages nobody holds
    new = paged_of(100, previous=old)
    assert new.num_free_pages == 8 - 5  # a, b: 3 shared + 1 each
    new.check_invariants([a, b], shared_ok=True)
    new.free(a)
    new.free(b)
    assert new.num_free_pages == 8


def test_radix_to_radix_adopts_the_tree():
    old = cache_of(8)
    a = req(PREFIX + [1])
    run(old, a)
    new = cache_of(100, previous=old)
    assert new.tree is old.tree and new.match_prefix(req(PREFIX + [2])) == 12
    new.free(a)
    new.check_invariants([a])


def test_a_shared_page_survives_radix_paged_radix_until_its_last_holder_frees_it():
    first = cache_of(8)
    a, b = req(PREFIX + [1]), req(PREFIX + [2])
    run(first, a)
    run(first, b)
    third = cache_of(previous=paged_of(previous=first))
    third.check_invariants([a, b])
    third.free(a)
    third.check_invariants([a, b])
    third.free(b)
    third.check_invariants([a, b])
    assert third.num_free_pages == 8


def test_free_caches_full_pages_that_were_never_committed():
    old = paged_of(8)
    a = req(PREFIX + [1])
    old.allocate_kv([a], [13])
    a.num_computed_tokens = 13
    new = cache_of(100, previous=old)  # adopted mid-request: nothing of a is in the tree yet
    new.free(a)
    assert new.match_prefix(req(PREFIX + [2])) == 12
    new.check_invariants([a])
