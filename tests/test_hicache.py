"""HiCache: pages evicted from the device go to a host pool and come back on a hit, with the
same KV; write-through vs write-back; a full host pool drops its least recently used copies;
and a device pool too small for the working set hits more with the host tier."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pegboard.core.bench.prefix import PrefixWorkload
from pegboard.core.llm import LLM
from pegboard.plugins.cache.hicache import HiCache, HiCacheOptions
from pegboard.plugins.cache.radix import RadixCache
from pegboard.sdk.slots import KVCache, PluginContext
from pegboard.sdk.types import ModelInfo, Request, SamplingParams

PAGE = 4
PREFIX = list(range(100, 112))  # 3 pages


def cache_of(num_pages: int = 8, previous: KVCache | None = None, **options) -> HiCache:
    info = ModelInfo("tiny", 2, 2, 2, 8, 16, 32, 4096, torch.float32, torch.device("cpu"))
    cache = HiCache(HiCacheOptions(**options))
    cache.setup(
        PluginContext(info, engine={"page_size": PAGE, "kv_cache_tokens": num_pages * PAGE}),
        previous,
    )
    return cache


def req(tokens: list[int]) -> Request:
    return Request(list(tokens), SamplingParams(max_tokens=4))


def run(cache: KVCache, r: Request, n: int | None = None) -> None:
    """One engine step of `r`: allocate, "forward" (write distinct KV into its new pages),
    commit."""
    if n is None:
        n = r.num_tokens - (r.num_computed_tokens or cache.match_prefix(r))
    assert cache.allocate_kv([r], [n]) == []
    for i in range(r.num_computed_tokens, r.num_computed_tokens + n):
        page, slot = r.page_table[i // PAGE], i % PAGE
        for layer in cache.pool.k + cache.pool.v:
            layer[page, slot] = float(r.token_ids[i] * (i + 1))
    r.num_computed_tokens += n
    cache.commit([r])


def kv_of(cache: KVCache, r: Request, num_tokens: int) -> torch.Tensor:
    pages = r.page_table[: num_tokens // PAGE]
    return torch.stack([layer[pages] for layer in cache.pool.k + cache.pool.v])


def fill_with_other_work(cache: KVCache, num_tokens: int) -> Request:
    hog = req([9] * num_tokens)
    run(cache, hog, num_tokens)
    return hog


def test_evicted_pages_go_to_the_host_and_still_match():
    cache = cache_of(8, write_policy="write_back")
    a = req(PREFIX + [1])
    run(cache, a)
    cache.free(a)
    assert cache.stats()["host_backed_up_pages"] == 0
    hog = fill_with_other_work(cache, 32)  # the whole device pool
    assert all(not n.on_device for n in cache.tree.match(PREFIX).nodes)
    assert cache.stats()["host_backed_up_pages"] >= 3
    assert cache.match_prefix(req(PREFIX + [2])) == 12
    cache.check_invariants([hog])


def test_a_host_hit_loads_the_same_kv_back():
    cache = cache_of(8, write_policy="write_back")
    a = req(PREFIX + [1])
    run(cache, a)
    expected = kv_of(cache, a, 12).clone()
    cache.free(a)
    hog = fill_with_other_work(cache, 32)
    cache.free(hog)
    b = req(PREFIX + [2])
    assert cache.pages_needed(b, 1) == 4  # three pages to load, one new
    run(cache, b)
    assert b.num_cached_tokens == 12
    assert torch.equal(kv_of(cache, b, 12), expected)
    stats = cache.stats()
    assert stats["host_loaded_pages"] == 3 and stats["host_hit_tokens"] == 12
    cache.check_invariants([b, hog])


def test_write_through_copies_when_pages_enter_the_tree():
    through, back = cache_of(8), cache_of(8, write_policy="write_back")
    for cache in (through, back):
        a = req(PREFIX + [1])
        run(cache, a)
        cache.free(a)
    assert through.stats()["host_backed_up_pages"] == 3
    assert back.stats()["host_backed_up_pages"] == 0


def test_without_room_on_the_host_eviction_drops_the_oldest_prefix():
    cache = cache_of(8, host_ratio=0.5, write_policy="write_back")  # 4 host pages
    old, new = req([1] * 12 + [0]), req([2] * 12 + [0])
    for r in (old, new):
        run(cache, r)
        cache.free(r)
    hog = fill_with_other_work(cache, 32)
    assert cache.match_prefix(req([2] * 12 + [5])) == 12
    assert cache.match_prefix(req([1] * 12 + [5])) == 0
    assert cache.stats()["host_evicted_pages"] == 3
    cache.check_invariants([hog])


def test_swapping_to_radix_keeps_the_device_tree_and_drops_the_host_tier():
    old = cache_of(8, write_policy="write_back")
    a, b = req(PREFIX + [1]), req([3] * 13)
    run(old, a)
    old.free(a)
    run(old, b, 8)
    hog = fill_with_other_work(old, 20)
    # The hog took two of the prefix's pages: one page is left on the device, two on the host.
    assert [n.on_device for n in old.tree.match(PREFIX).nodes] == [True, False]
    assert old.match_prefix(req(PREFIX + [2])) == 12
    new = RadixCache()
    new.setup(PluginContext(engine={"page_size": PAGE}), old)
    assert new.match_prefix(req(PREFIX + [2])) == 4
    assert new.match_prefix(req([3] * 13)) == 8
    new.check_invariants([b, hog])
    back = cache_of(100, previous=new)
    assert back.tree is new.tree and back.num_pages == 8
    back.check_invariants([b, hog])


operations = st.lists(
    st.tuples(st.sampled_from(["step", "step", "free"]), st.integers(0, 5), st.integers(1, 9)),
    max_size=50,
)


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_invariants_hold_under_random_steps_and_frees(policy, ops):
    cache = cache_of(10, host_ratio=0.7, write_policy=policy)
    bases = [PREFIX, PREFIX[:8] + [7] * 4, [3] * 12]
    requests = [req(bases[i % 3] + [i, i + 1, i + 2]) for i in range(6)]
    for op, i, n in ops:
        r = requests[i]
        if op == "free":
            cache.free(r)
            r.num_computed_tokens = 0
        else:
            start = r.num_computed_tokens or cache.match_prefix(r)
            n = min(n, r.num_tokens - start)
            if n == 0:
                r.token_ids.append(1)
                continue
            if not cache.allocate_kv([r], [n]):
                r.num_computed_tokens += n
                cache.commit([r])
        cache.check_invariants(requests)
    for r in requests:
        cache.free(r)
    cache.check_invariants(requests)
    assert cache.num_free_pages == cache.num_pages


def test_the_host_tier_raises_the_hit_rate_when_the_device_pool_is_too_small(tiny_llama_dir):
    workload = PrefixWorkload(
        num_groups=6, per_group=4, prefix_len=48, min_suffix=2, max_suffix=8, output_len=4,
        max_token_id=300, order="interleaved",
    )  # fmt: skip
    prompts, params = workload.build()
    results = {}
    for kv_cache in ("paged", "radix", "hicache"):
        with LLM(
            str(tiny_llama_dir),
            kv_cache=kv_cache,
            dtype="float32",
            device="cpu",
            page_size=4,
            kv_cache_tokens=160,
            max_running_requests=4,
        ) as llm:
            outs = llm.generate(prompts, params)
            stats = llm.engine.kv.stats()
        rate = stats.get("prefix_hit_tokens", 0) / max(stats.get("prefix_query_tokens", 0), 1)
        results[kv_cache] = ([o.token_ids for o in outs], rate, stats)
    assert results["hicache"][0] == results["radix"][0] == results["paged"][0]
    assert results["hicache"][2]["host_hit_tokens"] > 0
    assert results["hicache"][1] > results["radix"][1] + 0.2
