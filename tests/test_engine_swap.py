"""Runtime swaps (DESIGN.md §3): applied at a step boundary, no request lost, outputs unchanged;
a failed swap keeps the old plugin serving."""

from __future__ import annotations

import random

import pytest
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import OptionsError, PluginError, PluginManager
from pegboard.core.swap import SwapError
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.sdk.types import SamplingParams

MAX_NEW = 10


def prompts(n: int = 12, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 300) for _ in range(rng.randint(4, 30))] for _ in range(n)]


class FailingSetupScheduler(FCFSScheduler):
    """A scheduler whose setup raises, as a third-party plugin with a bug would."""

    name = "failing-setup"

    def setup(self, ctx, previous=None):
        raise RuntimeError("cannot start: license server unreachable")


class DrainingScheduler(FCFSScheduler):
    """A scheduler that cannot hand over its state: the engine must drain it first."""

    name = "draining"
    handoff = "drain"


def make_llm(model_dir, **settings) -> LLM:
    manager = PluginManager()
    manager.add(FailingSetupScheduler, name="failing-setup")
    manager.add(DrainingScheduler, name="draining")
    return LLM(str(model_dir), plugins=manager, dtype="float32", device="cpu", **settings)


def generate_with_swaps(llm: LLM, swaps_at: dict[int, tuple]) -> tuple[dict[str, list[int]], list]:
    """Run the prompts, calling `llm.swap(*args)` before the given step numbers."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    from pegboard.sdk.types import Request

    requests = [Request(p, params) for p in prompts()]
    for r in requests:
        llm.engine.add_request(r)
    futures, step = [], 0
    while llm.engine.has_work():
        if step in swaps_at:
            futures.append(llm.swap(*swaps_at[step]))
        llm.engine.step()
        step += 1
    assert all(r.finished for r in requests)
    return {r.request_id: r.output_token_ids for r in requests}, futures


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    with make_llm(tiny_llama_dir, max_num_batched_tokens=32) as llm:
        outs, _ = generate_with_swaps(llm, {})
    return list(outs.values())


@pytest.mark.parametrize(
    "swaps",
    [
        pytest.param({2: ("scheduler", "sjf"), 6: ("scheduler", "fcfs")}, id="sjf-fcfs"),
        pytest.param({3: ("sampler", "standard")}, id="sampler"),
        pytest.param({3: ("kv_cache", "paged")}, id="kv-cache-state-handoff"),
        pytest.param({4: ("attention", "torch")}, id="attention-rebuild"),
    ],
)
def test_swap_mid_batch_keeps_every_request_and_output(tiny_llama_dir, reference, swaps):
    with make_llm(tiny_llama_dir, max_num_batched_tokens=32) as llm:
        outs, futures = generate_with_swaps(llm, swaps)
        results = [f.result(timeout=0) for f in futures]
        assert [(r.slot, r.active) for r in results] == list(swaps.values())
        assert llm.engine.plugins.active(results[-1].slot) is not None
        assert llm.engine.plugins.active(results[-1].slot).name == results[-1].active
    assert list(outs.values()) == reference


def test_swap_to_unknown_name_fails_at_once_and_keeps_old(tiny_llama_dir):
    with make_llm(tiny_llama_dir) as llm:
        with pytest.raises(PluginError, match="fcfs"):
            llm.swap("scheduler", "no-such-policy")
        assert llm.engine.plugins.active("scheduler").name == "fcfs"


def test_swap_with_bad_options_names_the_field_and_keeps_old(tiny_llama_dir):
    with make_llm(tiny_llama_dir) as llm:
        with pytest.raises(OptionsError, match="conservativeness"):
            llm.swap("scheduler", "sjf", conservativeness="lots")
        assert llm.engine.plugins.active("scheduler").name == "fcfs"


def test_swap_whose_setup_raises_keeps_old_plugin_serving(tiny_llama_dir, reference):
    with make_llm(tiny_llama_dir, max_num_batched_tokens=32) as llm:
        outs, futures = generate_with_swaps(llm, {2: ("scheduler", "failing-setup")})
        with pytest.raises(SwapError, match="license server unreachable"):
            futures[0].result(timeout=0)
        assert llm.engine.plugins.active("scheduler").name == "fcfs"
    assert list(outs.values()) == reference


def test_swap_from_draining_plugin_waits_for_running_requests(tiny_llama_dir, reference):
    with make_llm(tiny_llama_dir, scheduler="draining", max_num_batched_tokens=32) as llm:
        engine = llm.engine
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        from pegboard.sdk.types import Request

        first = [Request(p, params) for p in prompts()[:6]]
        later = [Request(p, params) for p in prompts()[6:]]
        for r in first:
            engine.add_request(r)
        engine.step()
        future = llm.swap("scheduler", "fcfs")
        for r in later:
            engine.add_request(r)
        running_at_swap = list(engine.running)
        waiting_at_swap = list(engine.waiting) + later
        assert running_at_swap
        while not future.done():
            # Draining: nothing waiting is admitted while the old scheduler finishes its work.
            assert all(r.num_computed_tokens == 0 for r in waiting_at_swap)
            engine.step()
        assert future.result().drained
        assert all(r.finished for r in running_at_swap)
        while engine.has_work():
            engine.step()
        assert engine.plugins.active("scheduler").name == "fcfs"
        assert [r.output_token_ids for r in first + later] == reference
