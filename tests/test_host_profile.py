"""`HostProfile` (`--profile-host`): the phases it reports, the forward's parts, and that it
puts every wrapped attribute back."""

from __future__ import annotations

import time

import pytest
from pegboard.core.bench.host_profile import TOTAL, HostProfile
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams


def test_forward_parts_are_timed_inside_the_forward_and_unwrapped_after(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        runner = llm.engine.runner
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        with HostProfile(llm.engine, clock=time.thread_time) as profile:
            llm.generate([[1, 5, 9, 3], [1, 7, 2]], params)
        report = profile.report()
        phases = report["ms_per_step"]
        forward = phases["forward (launch)"]
        for part in ("forward: attention.prepare", "forward: compute_logits"):
            assert 0 < phases[part] <= forward, (part, phases)
        assert phases["forward: attention.prepare"] + phases["forward: compute_logits"] <= forward
        assert phases[TOTAL] >= forward and report["steps"] >= 6
        # the instance attributes the profile set are gone: the classes' methods show again
        assert "prepare" not in vars(runner.attention)
        assert "compute_logits" not in vars(runner.model)
        assert "forward" not in vars(runner)


def test_sample_parts_are_timed_inside_sample_and_unwrapped_after(tiny_llama_dir):
    from pegboard.core import contract

    check = contract.check_sample
    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        sampler = llm.engine.plugins.active("sampler")
        params = SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True)
        with HostProfile(llm.engine, clock=time.thread_time) as profile:
            llm.generate([[1, 5, 9, 3], [1, 7, 2]], params)
        phases = profile.report()["ms_per_step"]
        for part in ("sample: batch facts", "sample: check"):
            assert 0 < phases[part] <= phases["sample"], (part, phases)
        assert "_batch_facts" not in vars(sampler)
    assert contract.check_sample is check


def test_torch_profile_records_the_window_of_steps_and_unwraps_step(tiny_llama_dir, tmp_path):
    from pegboard.core.bench.torch_profile import TorchProfile

    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        with TorchProfile(llm.engine, str(tmp_path), wait=2, active=3):
            llm.generate([[1, 5, 9, 3], [1, 7, 2]], params)
        assert "step" not in vars(llm.engine)
    table = (tmp_path / "kernels.txt").read_text()
    assert table.startswith("3 engine steps after 2") and "aten::" in table
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_torch_profile_window_can_start_at_the_first_step(tiny_llama_dir, tmp_path):
    from pegboard.core.bench.torch_profile import TorchProfile

    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        with TorchProfile(llm.engine, str(tmp_path), wait=0, active=1):
            llm.generate([[1, 5, 9, 3, 4, 8, 2, 6]], params)
    # the profiler numbers the steps it sees from 0: the one recorded is the first (the prefill)
    trace = (tmp_path / "trace.json").read_text()
    assert "ProfilerStep#0" in trace and "ProfilerStep#1" not in trace


def test_forward_steps_are_counted_by_kind(tiny_llama_dir):
    from pegboard.core.bench.host_profile import step_kind

    assert [step_kind(q) for q in ([1, 1], [1, 5], [4, 5])] == ["decode", "mixed", "prefill"]
    with LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=3) as llm:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        with HostProfile(llm.engine, clock=time.thread_time) as profile:
            # a 3-token prompt prefills, then decodes beside the 9-token one's chunks
            llm.generate([[1, 5, 9], [1, 7, 2, 4, 6, 8, 3, 5, 7]], params)
        report = profile.report()
        kinds = report["forward_by_kind"]
        assert set(kinds) == {"prefill", "mixed", "decode"}, kinds
        assert sum(k["steps"] for k in kinds.values()) == report["steps"]
        assert "forward" not in vars(llm.engine.runner)
        # each step's host work by its kind: the same steps, adding up to the whole (the take
        # between steps aside)
        host = report["host_ms_by_kind"]
        assert {k: v["steps"] for k, v in host.items()} == {k: v["steps"] for k, v in kinds.items()}
        whole = sum(v["steps"] * v["host_ms_per_step"] for v in host.values()) / report["steps"]
        phases = report["ms_per_step"]
        expected = phases[TOTAL] - phases.get("resolve: wait for tokens", 0.0)
        assert abs(whole - expected) <= 0.01 * expected + 0.01, (whole, expected)
        assert "step" not in vars(llm.engine)


def test_speculation_phases_and_verify_steps(tiny_llama_dir):
    """With a speculator: `propose`, `mark_rows` and `verify` are phases, a step carrying
    drafts counts as a `verify` step, and the verify's read of the target's tokens is booked
    as a wait (inside `verify`, not host work); everything is unwrapped after."""
    from pegboard.core.bench.host_profile import SPEC_WAIT
    from test_speculative import oracle_plugins

    prompt = [5, 9, 3, 7, 11, 4]
    plugins = oracle_plugins({tuple(prompt): list(range(20, 40))}, 0)  # drafts (mostly wrong)
    with LLM(str(tiny_llama_dir), dtype="float32", plugins=plugins, speculator="oracle") as llm:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        with HostProfile(llm.engine, clock=time.perf_counter) as profile:
            llm.generate([prompt], params)
        report = profile.report()
        speculation = llm.engine.speculation
        assert not {"propose", "mark_rows", "read_tokens"} & set(vars(speculation))
        assert "_verify" not in vars(llm.engine)
    phases = report["ms_per_step"]
    for phase in ("speculation: propose", "speculation: mark_rows", "speculation: verify"):
        assert phases[phase] > 0, (phase, phases)
    assert 0 < phases[SPEC_WAIT] <= phases["speculation: verify"]
    assert report["forward_by_kind"]["verify"]["steps"] == speculation.num_verify > 0
    assert report["device_wait_ms_per_step"] >= phases[SPEC_WAIT]


@pytest.mark.slow
def test_tensor_parallel_rank_0_phases_are_timed(tiny_llama_dir):
    """With TP, rank 0's messages to the followers: the whole and its two parts."""
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", tp_size=2) as llm:
        tp = llm.engine.runner.tp
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        with HostProfile(llm.engine, clock=time.thread_time) as profile:
            llm.generate([[1, 5, 9, 3], [1, 7, 2]], params)
        phases = profile.report()["ms_per_step"]
        share = phases["forward: tp share batch"]
        parts = phases["forward: tp plan message"] + phases["forward: tp batch tensors"]
        assert 0 < parts <= share <= phases["forward (launch)"], phases
        assert "share_batch" not in vars(tp) and "broadcast_objects" not in vars(tp.groups)
