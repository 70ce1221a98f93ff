"""The heap frozen after an engine's start-up (`core/heap_freeze.py`, `--gc-freeze`): frozen
once the engine is ready, not with the flag off, given back at close (a closed engine's model
and KV pool are collected), the same completions either way, and the figures `bench offline`
reports (gc runs and ms per generation, step ms)."""

from __future__ import annotations

import argparse
import gc
import weakref

import pytest
from pegboard.core.bench.gc_time import GcTime, StepTimes
from pegboard.core.bench.offline import OfflineWorkload, run_offline
from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams

PROMPTS = [[5, 9, 200, 31, 7], [300, 4, 4, 18]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def thawed():
    """Each test starts and ends with nothing frozen (another test's engine left unclosed)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def _llm(model_dir, **settings) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", **settings)


def test_the_heap_is_frozen_once_the_engine_is_ready_and_not_with_the_flag_off(tiny_llama_dir):
    with _llm(tiny_llama_dir, gc_freeze=False) as llm:
        assert gc.get_freeze_count() == 0
        off = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, progress=False)]
    with _llm(tiny_llama_dir) as llm:
        assert llm.engine.config.gc_freeze  # the default
        # the engine's own objects are among the frozen: its model's modules, its runner
        assert gc.get_freeze_count() > 10_000
        assert not gc.is_tracked(llm.engine.runner) or _frozen(llm.engine.runner)
        on = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, progress=False)]
        assert gc.get_freeze_count() > 0  # serving does not thaw it
    assert gc.get_freeze_count() == 0  # close gives the heap back to the collector
    assert on == off


def _frozen(obj) -> bool:
    """`obj` is in the permanent generation: no generation's list holds it."""
    return all(obj is not o for gen in (0, 1, 2) for o in gc.get_objects(gen))


def test_a_closed_engine_is_collected_with_freezing_on(tiny_llama_dir):
    llm = _llm(tiny_llama_dir)
    assert gc.get_freeze_count() > 0
    engine = weakref.ref(llm.engine)
    model = weakref.ref(llm.engine.runner.model)
    pool = weakref.ref(llm.engine.kv.pool.k[0])  # a KV pool tensor
    llm.close()
    del llm
    gc.collect()
    assert engine() is None and model() is None and pool() is None


def test_an_unclosed_unreachable_engine_is_collected_by_the_next_start_up(tiny_llama_dir):
    """An engine dropped without `close` (frozen by its start-up) is collected when the next
    engine of the process freezes the heap (an earlier freeze is undone first)."""
    llm = _llm(tiny_llama_dir)
    model = weakref.ref(llm.engine.runner.model)
    del llm
    gc.collect()  # frozen cycles: not collected
    with _llm(tiny_llama_dir):
        assert model() is None


def test_the_cli_flag_sets_the_config_field():
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert "gc_freeze" not in engine_settings(p.parse_args([]))  # the config's default: on
    assert engine_settings(p.parse_args(["--no-gc-freeze"]))["gc_freeze"] is False
    assert engine_settings(p.parse_args(["--gc-freeze"]))["gc_freeze"] is True


def test_gc_time_counts_collections_by_generation():
    with GcTime() as t:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    r = t.report()
    assert r["runs_by_generation"] == [1, 0, 2]
    assert r["ms"] == pytest.approx(sum(r["ms_by_generation"]), abs=0.01)
    assert 0 < r["max_ms"] <= r["ms"]


def test_bench_offline_reports_gc_and_step_times(tiny_llama_dir):
    workload = OfflineWorkload(
        num_seqs=3, min_input=4, max_input=8, min_output=5, max_output=9, max_token_id=500
    )
    with _llm(tiny_llama_dir) as llm:
        result = run_offline(llm, workload, progress=False)
        assert "step" not in vars(llm.engine)  # the timer is removed after the run
    gc_report, steps = result["gc"], result["step_ms"]
    assert len(gc_report["runs_by_generation"]) == 3 and gc_report["frozen_objects"] > 0
    assert steps["steps"] == result["steps"]
    assert 0 < steps["p50_ms"] <= steps["p99_ms"] <= steps["max_ms"]


def test_step_times_wraps_another_profilers_wrapper_and_puts_it_back(tiny_llama_dir):
    with _llm(tiny_llama_dir) as llm:
        engine = llm.engine
        calls = []
        inner = engine.step

        def other():
            calls.append(1)
            return inner()

        engine.step = other
        with StepTimes(engine) as times:
            llm.generate(PROMPTS[:1], GREEDY, progress=False)
        assert engine.step is other and len(calls) == times.report()["steps"] > 0


@pytest.mark.gpu
def test_cuda_engines_built_again_free_their_pool_and_graphs_with_freezing_on(tiny_llama_dir):
    """On CUDA (graphs captured, the pool sized from free memory): an engine dropped without
    `close` is collected before the next one sizes its pool (the same size both times), and a
    closed one gives all its device memory back."""
    import torch
    from fixtures.devices import GPU_ENGINE

    def build() -> LLM:
        return LLM(
            str(tiny_llama_dir), dtype="bfloat16", gpu_memory_utilization=0.3,
            cuda_graph_max_bs=8, cuda_graph_mixed_max_tokens=64, **GPU_ENGINE,
        )  # fmt: skip

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    first = build()
    assert gc.get_freeze_count() > 0 and first.engine.runner.cuda_graphs is not None
    pages = first.engine.kv.pool.k[0].shape[0]
    pool_bytes = sum(t.numel() * t.element_size() for t in first.engine.kv.pool.k)
    del first  # not closed: frozen with its cycles until the next start-up
    second = build()
    assert second.engine.kv.pool.k[0].shape[0] == pages
    second.close()
    del second
    gc.collect()
    torch.cuda.synchronize()
    # (what stays is not a pool: cuBLAS workspaces and the like, made on first use)
    assert torch.cuda.memory_allocated() - before < min(256 << 20, pool_bytes // 4)


@pytest.mark.parametrize("slot,name", [("kv_cache", "paged"), ("attention", "torch")])
def test_a_swapped_out_plugin_is_collected_with_freezing_on(tiny_llama_dir, slot, name):
    """A plugin swapped out is not kept by the frozen heap, even when its state holds a
    reference cycle (CUDA graph runners do), and the new plugin is frozen once it serves."""
    with _llm(tiny_llama_dir) as llm:
        plugin = llm.engine.plugins.active(slot)
        plugin.own_cycle = plugin  # frozen at start-up with it
        old = weakref.ref(plugin)
        del plugin
        future = llm.swap(slot, name)
        while not future.done():
            llm.engine.step()
        future.result()
        gc.collect()
        assert old() is None
        assert _frozen(llm.engine.plugins.active(slot))  # frozen again after the swap
        out = llm.generate(PROMPTS[:1], GREEDY, progress=False)
        assert len(out[0].token_ids) == GREEDY.max_tokens
