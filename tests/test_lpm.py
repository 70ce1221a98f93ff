"""The `lpm` scheduler: longest cached prefix first, FCFS fallback over a queue length,
in-batch prefix deferral, the starvation guard, and its hit rate against FCFS."""

from __future__ import annotations

import pytest
import torch
from pegboard.core.bench.prefix import PrefixWorkload
from pegboard.core.llm import LLM
from pegboard.plugins.cache.radix import RadixCache
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.plugins.scheduling.lpm import LPMOptions, LPMScheduler
from pegboard.sdk.slots import PluginContext
from pegboard.sdk.types import ModelInfo, Request, SamplingParams, StepBudget

PAGE = 4
CACHED = list(range(100, 132))  # 8 pages in the tree


def radix_with_cached_prefix() -> RadixCache:
    info = ModelInfo("tiny", 2, 2, 2, 8, 16, 32, 4096, torch.float32, torch.device("cpu"))
    cache = RadixCache()
    cache.setup(PluginContext(info, engine={"page_size": PAGE, "kv_cache_tokens": 64 * PAGE}))
    warm = Request(CACHED + [1], SamplingParams(max_tokens=1))
    cache.allocate_kv([warm], [33])
    warm.num_computed_tokens = 33
    cache.free(warm)
    return cache


def lpm(**options) -> LPMScheduler:
    scheduler = LPMScheduler(LPMOptions(**options))
    scheduler.setup(PluginContext())
    return scheduler


def budget(tokens: int) -> StepBudget:
    return StepBudget(max_batched_tokens=tokens, max_running_requests=8, max_model_len=4096)


def scheduled(plan) -> list[Request]:
    return [s.request for s in plan.scheduled]


def waiting_pair() -> tuple[Request, Request]:
    """An earlier request with nothing cached and a later one with a 32-token hit."""
    cold = Request([7] * 40, SamplingParams(max_tokens=4))
    warm = Request(CACHED + [2] * 8, SamplingParams(max_tokens=4))
    return cold, warm


def test_the_longest_cached_prefix_goes_first():
    kv = radix_with_cached_prefix()
    cold, warm = waiting_pair()
    assert scheduled(lpm().schedule([cold, warm], [], budget(8), kv)) == [warm]
    assert scheduled(FCFSScheduler().schedule([cold, warm], [], budget(8), kv)) == [cold]


def test_a_long_queue_falls_back_to_arrival_order():
    kv = radix_with_cached_prefix()
    cold, warm = waiting_pair()
    plan = lpm(fcfs_threshold=1).schedule([cold, warm], [], budget(8), kv)
    assert scheduled(plan) == [cold]


def test_a_request_passed_over_max_wait_steps_goes_first():
    kv = radix_with_cached_prefix()
    scheduler = lpm(max_wait_steps=2)
    cold, warm = waiting_pair()
    others = [Request(CACHED + [3] * 8, SamplingParams(max_tokens=4)) for _ in range(2)]
    order = []
    for w in [warm, *others]:
        plan = scheduler.schedule([cold, w], [], budget(8), kv)
        order.append(scheduled(plan)[0])
    assert order == [warm, others[0], cold]
    assert scheduler.steps_passed_over(cold) == 2


def test_requests_sharing_an_uncached_prefix_wait_for_the_first_to_compute_it():
    kv = radix_with_cached_prefix()
    shared = [5] * 36
    a, b = (Request(shared + [i], SamplingParams(max_tokens=4)) for i in (1, 2))
    assert scheduled(lpm().schedule([a, b], [], budget(200), kv)) == [a]
    assert scheduled(lpm(in_batch_prefix_tokens=0).schedule([a, b], [], budget(200), kv)) == [
        a,
        b,
    ]


def test_lpm_hits_more_than_fcfs_on_interleaved_prefix_groups(tiny_llama_dir):
    workload = PrefixWorkload(
        num_groups=4, per_group=4, prefix_len=48, min_suffix=2, max_suffix=8, output_len=4,
        max_token_id=300, order="interleaved",
    )  # fmt: skip
    prompts, params = workload.build()
    results = {}
    for scheduler in ("fcfs", "lpm"):
        with LLM(
            str(tiny_llama_dir),
            kv_cache="radix",
            scheduler=scheduler,
            dtype="float32",
            device="cpu",
            page_size=4,
            kv_cache_tokens=128,
            max_running_requests=2,
        ) as llm:
            outs = llm.generate(prompts, params)
            stats = llm.engine.kv.stats()
        results[scheduler] = (
            [o.token_ids for o in outs],
            stats["prefix_hit_tokens"] / stats["prefix_query_tokens"],
        )
    assert results["lpm"][0] == results["fcfs"][0]
    assert results["lpm"][1] > 0.6
    assert results["lpm"][1] > results["fcfs"][1] + 0.3


@pytest.mark.parametrize("bad", [{"fcfs_threshold": -1}, {"max_wait_steps": -2}])
def test_negative_options_are_rejected(bad):
    with pytest.raises(ValueError):
        LPMOptions(**bad)
