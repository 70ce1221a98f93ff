"""The routing policies (`router` slot) on their own: each routes as its docstring says, keeps
the slot contract (conformance kit), and the slot lives in the router, not in engines."""

from __future__ import annotations

import pytest
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.routing.cache_aware import CacheAwareRouter
from pegboard.plugins.routing.least_load import LeastLoadRouter
from pegboard.plugins.routing.prefix_tree import PrefixTree
from pegboard.plugins.routing.round_robin import RoundRobinRouter
from pegboard.sdk import Router, RouteRequest, WorkerLoad, prompt_key
from pegboard.sdk.slots import SLOTS, PluginContext
from pegboard.sdk.testing import ConformanceError
from pegboard.sdk.testing_router import check_router

A, B, C = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
SYSTEM = "You are a terse assistant who answers in one line. " * 4


def policy(cls: type[Router], **options) -> Router:
    plugin = cls(cls.Options(**options))
    plugin.setup(PluginContext())
    return plugin


def req(text: str) -> RouteRequest:
    return RouteRequest("/v1/completions", text, {"prompt": text})


def loads(**in_flight: int) -> list[WorkerLoad]:
    urls = {"a": A, "b": B, "c": C}
    return [WorkerLoad(urls[k], in_flight=n) for k, n in in_flight.items()]


@pytest.mark.parametrize("cls", [RoundRobinRouter, LeastLoadRouter, CacheAwareRouter])
def test_builtin_policies_pass_the_conformance_kit(cls):
    check_router(cls)


def test_the_kit_rejects_a_policy_returning_a_worker_it_was_not_offered():
    class Sticky(Router):
        name = "sticky"

        def route(self, request, workers):
            return A  # even when A failed this request or is gone

    with pytest.raises(ConformanceError, match="one of `workers`"):
        check_router(Sticky)


def test_round_robin_takes_workers_in_turn():
    rr = policy(RoundRobinRouter)
    workers = loads(a=0, b=0, c=0)
    assert [rr.route(req("x"), workers) for _ in range(6)] == [A, B, C, A, B, C]


def test_least_load_picks_fewest_requests_then_fewest_tokens():
    ll = policy(LeastLoadRouter)
    assert ll.route(req("x"), loads(a=3, b=1, c=2)) == B
    tied = [WorkerLoad(A, 1, reported_tokens=900), WorkerLoad(B, 1, reported_tokens=100)]
    assert ll.route(req("x"), tied) == B


def test_least_load_counts_what_a_worker_reports_beyond_the_routers_own_requests():
    ll = policy(LeastLoadRouter)
    # A has few requests from this router but reports many (other clients): B is lighter.
    workers = [WorkerLoad(A, 0, reported_requests=10), WorkerLoad(B, 2, reported_requests=2)]
    assert ll.route(req("x"), workers) == B


def test_cache_aware_sends_a_shared_prefix_to_the_worker_that_has_it():
    ca = policy(CacheAwareRouter)
    first = ca.route(req(SYSTEM + "What is 2+2?"), loads(a=0, b=0))
    # B is now less loaded, but A holds the prefix (load gap 1 is within the guard).
    workers = loads(a=1, b=0) if first == A else loads(a=0, b=1)
    assert ca.route(req(SYSTEM + "Name a colour."), workers) == first
    assert ca.stats()["cache_routed"] == 1


def test_cache_aware_load_guard_needs_both_the_absolute_and_the_relative_gap():
    ca = policy(CacheAwareRouter, balance_abs_threshold=4, balance_rel_threshold=1.5)
    assert ca.route(req(SYSTEM + "q1"), loads(a=0, b=0)) == A
    # gap 4 is not above 4: the cache wins
    assert ca.route(req(SYSTEM + "q2"), loads(a=4, b=0)) == A
    # gap 5 > 4 but 15 / 10 is not above 1.5: the cache wins
    assert ca.route(req(SYSTEM + "q3"), loads(a=15, b=10)) == A
    # gap 5 > 4 and 5 > 0 * 1.5: the guard trips, the idlest worker takes it
    assert ca.route(req(SYSTEM + "q4"), loads(a=5, b=0)) == B
    assert ca.stats()["balance_routed"] == 1


def test_cache_aware_sends_a_miss_to_the_least_loaded_worker_not_the_smallest_tree():
    """sglang#14305: a worker busy with unique requests has a small tree; sending every miss
    to the smallest tree piles new traffic onto it while a worker with a big tree idles."""
    ca = policy(CacheAwareRouter, balance_abs_threshold=1000)
    ca.route(req("x" * 5000), loads(b=0))  # B holds a big tree
    ca.route(req("u"), loads(a=0))  # A holds a tiny one
    assert ca.route(req("an unrelated question"), loads(a=30, b=0)) == B
    assert ca.stats()["miss_routed"] == 3


def test_cache_aware_forgets_a_removed_worker():
    ca = policy(CacheAwareRouter)
    assert ca.route(req(SYSTEM + "q"), loads(a=0, b=0)) == A
    ca.remove_worker(A)
    assert ca.route(req(SYSTEM + "q"), loads(a=0, b=0)) == A  # a miss again: first idlest
    assert ca.stats()["miss_routed"] == 2


def test_cache_aware_hit_estimate_counts_matched_characters():
    ca = policy(CacheAwareRouter)
    ca.route(req("abcdefgh"), loads(a=0))
    ca.route(req("abcdWXYZ"), loads(a=0))
    stats = ca.stats()
    assert (stats["cache_hit_chars"], stats["cache_query_chars"]) == (4, 16)


def test_prefix_tree_matches_splits_and_evicts_least_recently_used():
    tree = PrefixTree()
    tree.insert("hello world")
    tree.insert("hello there")
    assert tree.match("hello wor") == 9
    assert tree.match("hello thermos") == 10
    assert tree.match("goodbye") == 0
    assert tree.chars == len("hello ") + len("world") + len("there")
    tree.match("hello world")  # "world" is now the most recently used leaf
    tree.evict(max_chars=11)
    assert tree.match("hello world") == 11
    assert tree.match("hello there") == 6


def test_prompt_key_keeps_token_id_prefixes_aligned():
    assert prompt_key([1, 2, 3]).startswith(prompt_key([1, 2]))
    assert prompt_key("text") == "text"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompt_key(chat) == "system:S\nuser:U"


def test_the_router_slot_runs_in_the_router_and_is_listed():
    from pegboard.core.cli.plugins import listing

    assert SLOTS["router"].process == "router" and SLOTS["scheduler"].process == "engine"
    names = {p["name"] for p in listing()["plugins"] if p["slot"] == "router"}
    assert {"round_robin", "least_load", "cache_aware"} <= names
    assert PluginManager().find("router", "cache_aware").cls is CacheAwareRouter


def test_an_engine_does_not_select_a_router(tiny_llama_dir):
    from pegboard.core.llm import LLM

    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    try:
        assert llm.engine.plugins.active("router") is None
        assert llm.engine.plugins.active("scheduler") is not None
    finally:
        llm.close()


def test_the_body_is_parsed_only_when_a_policy_reads_it():
    from pegboard.sdk.routing import RequestBodyError

    not_json = RouteRequest("/v1/completions", raw=b"{not json")
    assert policy(RoundRobinRouter).route(not_json, [WorkerLoad(A), WorkerLoad(B)]) in (A, B)
    with pytest.raises(RequestBodyError, match="not valid JSON"):
        _ = not_json.text
    chat = RouteRequest(
        "/v1/chat/completions", raw=b'{"messages": [{"role": "user", "content": "hi"}]}'
    )
    assert chat.text == "user:hi" and chat.body["messages"][0]["content"] == "hi"
