"""Prefix caching through the real engine: `radix` and `hicache` give the outputs of `paged`
(greedy, float32, CPU), the page invariant holds after every step under aborts and
preemptions, hits are reported in metrics, and paged -> radix -> paged swaps lose nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pegboard.core.hookspecs import hookimpl
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.cache.paged import PagedCache
from pegboard.sdk.slots import MetricsExporter
from pegboard.sdk.types import MetricsSnapshot, Request, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CACHES = ["radix", "hicache"]


def make_llm(model_dir, kv_cache: str, **settings) -> LLM:
    manager = PluginManager()
    manager.add(SnapshotRecorder, name="recorder")
    settings = {"page_size": 4, "max_num_batched_tokens": 64, "kv_cache_tokens": 2048, **settings}
    return LLM(
        str(model_dir),
        plugins=manager,
        kv_cache=kv_cache,
        dtype="float32",
        device="cpu",
        **settings,
    )


class SnapshotRecorder(MetricsExporter):
    """Keeps the step snapshots' prefix counters."""

    name = "recorder"

    def setup(self, ctx, previous=None) -> None:
        self.steps: list[tuple[int, int]] = []

    @hookimpl
    def export_metrics(self, snapshot: MetricsSnapshot) -> None:
        if snapshot.kind == "step":
            self.steps.append((snapshot.prefix_hit_tokens, snapshot.prefix_query_tokens))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(8, 300) for _ in range(n)]


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = tokens(rng, 40)
    return [system + tokens(rng, rng.randint(1, 12)) for _ in range(12)]


def random_prompts(seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [tokens(rng, rng.randint(3, 40)) for _ in range(12)]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def multi_turn(llm: LLM, seed: int = 2) -> list[list[int]]:
    """Three conversations of three turns: each turn's prompt is the previous prompt, the reply
    and a new user message."""
    rng = random.Random(seed)
    convs = [tokens(rng, 10) for _ in range(3)]
    replies = []
    for _ in range(3):
        outs = generate(llm, convs)
        replies.append(outs)
        convs = [c + o + tokens(rng, 5) for c, o in zip(convs, outs)]
    return replies


WORKLOADS = {
    "shared-prefix": lambda llm: generate(llm, shared_prefix_prompts()),
    "random": lambda llm: generate(llm, random_prompts()),
    "multi-turn": multi_turn,
}


@pytest.fixture(scope="module")
def paged_outputs(tiny_llama_dir):
    with make_llm(tiny_llama_dir, "paged") as llm:
        return {name: run(llm) for name, run in WORKLOADS.items()}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("kv_cache", CACHES)
@pytest.mark.parametrize("pool_tokens", [2048, 96], ids=["roomy", "tight"])
def test_outputs_equal_paged(tiny_llama_dir, paged_outputs, kv_cache, workload, pool_tokens):
    with make_llm(tiny_llama_dir, kv_cache, kv_cache_tokens=pool_tokens) as llm:
        assert WORKLOADS[workload](llm) == paged_outputs[workload]


def test_later_turns_of_a_conversation_hit_the_earlier_turns(tiny_llama_dir):
    with make_llm(tiny_llama_dir, "radix") as llm:
        multi_turn(llm)
        stats = llm.engine.kv.stats()
    assert stats["prefix_hit_tokens"] >= 3 * (16 + 24)  # turns 2 and 3, whole pages of turn 1/2


def test_sixteen_requests_sharing_a_system_prompt_mostly_hit(tiny_llama_dir):
    rng = random.Random(3)
    system = tokens(rng, 64)
    prompts = [system + tokens(rng, 16) for _ in range(16)]
    with make_llm(tiny_llama_dir, "radix", scheduler="lpm", metrics=["recorder"]) as llm:
        generate(llm, prompts)
        recorder = llm.engine.plugins.active_all("metrics")[0]
    hits, queries = recorder.steps[-1]
    assert queries == 16 * 80
    assert hits == 15 * 64  # everyone after the first reuses the whole system prompt
    assert hits / queries > 0.74


def test_paged_reports_no_prefix_hits(tiny_llama_dir):
    with make_llm(tiny_llama_dir, "paged", metrics=["recorder"]) as llm:
        generate(llm, shared_prefix_prompts())
        recorder = llm.engine.plugins.active_all("metrics")[0]
    assert recorder.steps[-1] == (0, 0)


def test_a_preempted_request_resumes_from_its_own_cached_pages(tiny_llama_dir, paged_outputs):
    with make_llm(tiny_llama_dir, "radix", kv_cache_tokens=96) as llm:
        outs = llm.generate(shared_prefix_prompts(), GREEDY)
    assert any(o.num_preemptions for o in outs)
    assert [o.token_ids for o in outs] == paged_outputs["shared-prefix"]


# ---------------------------------------------------------------------- invariants under load


def check(llm: LLM) -> None:
    engine = llm.engine
    holders = engine.running + list(engine.waiting)
    if isinstance(engine.kv, PagedCache):  # after a swap from radix, pages may be shared
        engine.kv.check_invariants(holders, shared_ok=True)
    else:
        engine.kv.check_invariants(holders)
    assert all(not r.page_table for r in engine.waiting)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 20), st.integers(1, 10)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
    ),
    min_size=5,
    max_size=40,
)


@pytest.mark.parametrize("kv_cache", CACHES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops)
def test_page_invariant_holds_after_every_step(tiny_llama_dir, kv_cache, script):
    rng = random.Random(0)
    prefixes = [tokens(rng, 24) for _ in range(4)]
    settings_ = {"kv_cache_tokens": 64, "max_num_batched_tokens": 24, "max_running_requests": 6}
    if kv_cache == "hicache":
        settings_["plugin_options"] = {"hicache": {"host_ratio": 0.5}}
    with make_llm(tiny_llama_dir, kv_cache, **settings_) as llm:
        engine, added = llm.engine, []
        for op, a, b, c in script:
            if op == "add":
                prompt = prefixes[a][: 4 * b] + tokens(rng, c)
                r = Request(prompt[:60], SamplingParams(max_tokens=c, temperature=0.0))
                engine.add_request(r)
                added.append(r)
            elif op == "abort" and added:
                engine.abort(added[a % len(added)].request_id)
            for _ in range(a if op == "step" else 1):
                engine.step()
                check(llm)
        while engine.has_work():
            engine.step()
            check(llm)
        assert all(r.finished for r in added)
        assert engine.kv.num_free_pages == engine.kv.num_pages


# ---------------------------------------------------------------------- runtime swap


def test_swap_paged_radix_paged_under_load_keeps_every_request_and_output(tiny_llama_dir):
    prompts = shared_prefix_prompts(5) + random_prompts(6)

    def run(swaps: dict[int, str]) -> list[list[int]]:
        with make_llm(tiny_llama_dir, "paged", kv_cache_tokens=160) as llm:
            requests = [Request(p, GREEDY) for p in prompts]
            for r in requests:
                llm.engine.add_request(r)
            step, futures = 0, []
            while llm.engine.has_work():
                if step in swaps:
                    futures.append(llm.swap("kv_cache", swaps[step]))
                llm.engine.step()
                check(llm)
                step += 1
            assert [f.result(timeout=0).active for f in futures] == list(swaps.values())
            assert all(r.finished and r.error is None for r in requests)
            assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
            return [r.output_token_ids for r in requests]

    reference = run({})
    assert run({2: "radix", 6: "paged", 9: "radix"}) == reference
    assert run({1: "hicache", 4: "radix", 7: "paged"}) == reference
