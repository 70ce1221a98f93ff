"""MoE serving through the engine: EPLB with redundant experts rebalancing every few steps
changes no output (greedy equals transformers), the recorder counts every routed token, the
placement plugin's answer is checked, and bad MoE flags fail before the model loads (exit 2)."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny_moe import build_tiny_moe
from pegboard.core.config import EngineConfig
from pegboard.core.llm import LLM
from pegboard.core.moe.flags import MoEFlagError, check_moe
from pegboard.sdk.expert_placement import ExpertPlacement
from pegboard.sdk.types import SamplingParams
from test_engine_parity import assert_same_tokens, hf_reference, make_prompts
from test_moe_ep import generate_exit


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


@pytest.fixture(scope="module")
def reference(qwen3_moe):
    prompts = make_prompts(512)[:8]
    return prompts, hf_reference(qwen3_moe, prompts, 10)


def test_eplb_rebalancing_with_redundant_experts_changes_no_output(qwen3_moe, reference):
    prompts, ref = reference
    params = SamplingParams(max_tokens=10, temperature=0.0)
    settings = dict(
        expert_placement="eplb",
        ep_num_redundant_experts=4,
        eplb_rebalance_num_iterations=2,
        max_num_batched_tokens=32,  # chunked prefill: rebalances land between chunks too
    )
    with LLM(str(qwen3_moe), dtype="float32", device="cpu", **settings) as llm:
        outs = llm.generate(prompts, params)
        runtime = llm.engine.moe
        assert runtime.rebalances >= 3, "EPLB never rebalanced during the run"
        placement = runtime.current()
        assert placement.num_physical == 8 + 4
        assert bool((placement.replica_count >= 1).all())
        assert int(placement.replica_count.max()) > 1, "no hot expert was replicated"
        load = runtime.recorder.load()
        assert load.shape == (2, 8)  # two sparse layers (layer 1 is dense)
    assert_same_tokens(outs, ref)


def test_recorder_counts_every_routed_token(qwen3_moe):
    prompt = list(range(20, 45))
    params = SamplingParams(max_tokens=1, temperature=0.0)
    settings = dict(expert_distribution_recorder_mode="stat", disable_overlap=True)
    # (with overlap, one more decode step of the finished request runs before it is seen)
    with LLM(str(qwen3_moe), dtype="float32", device="cpu", **settings) as llm:
        before = llm.engine.moe.recorder.load()  # the engine's warm-up forward counts too
        llm.generate([prompt], params)
        load = llm.engine.moe.recorder.load() - before
    # 25 prompt tokens, top-2 experts each, in every sparse layer
    assert load.sum(dim=1).tolist() == [50.0, 50.0]


def test_an_invalid_placement_is_reported_naming_the_plugin_and_kept(qwen3_moe, caplog):
    with LLM(str(qwen3_moe), dtype="float32", device="cpu", expert_placement="eplb") as llm:
        runtime = llm.engine.moe
        before = runtime.current().physical_to_logical.clone()
        runtime._apply(torch.zeros(2, 8), "expert_placement plugin 'eplb'")
        assert "'eplb' returned tensor" in caplog.text and "not an ExpertPlacement" in caplog.text
        missing = ExpertPlacement(torch.zeros(2, 8, dtype=torch.int64), 8)  # only expert 0
        runtime._apply(missing, "expert_placement plugin 'eplb'")
        assert "logical expert 1 of layer 0 has no replica" in caplog.text
        assert torch.equal(runtime.current().physical_to_logical, before)


def test_check_moe_errors(qwen3_moe, tiny_llama_dir):
    with pytest.raises(MoEFlagError, match="needs a mixture-of-experts model; LlamaForCausalLM"):
        check_moe(EngineConfig(model=str(tiny_llama_dir), expert_placement="eplb"))
    with pytest.raises(MoEFlagError, match="--ep-size 3 does not divide the 8 experts"):
        check_moe(EngineConfig(model=str(qwen3_moe), ep_size=3))
    with pytest.raises(MoEFlagError, match="does not divide the 8 experts \\+ 1 redundant"):
        check_moe(EngineConfig(model=str(qwen3_moe), ep_size=2, ep_num_redundant_experts=1))
    with pytest.raises(MoEFlagError, match="with --tp-size 2 add --ep-size 2"):
        check_moe(EngineConfig(model=str(qwen3_moe), tp_size=2))
    check_moe(EngineConfig(model=str(tiny_llama_dir), tp_size=2))  # dense TP: not our business
    check_moe(EngineConfig(model=str(qwen3_moe), expert_placement="eplb"))  # fine


def test_cli_rejects_ep_flags_on_a_dense_model_with_exit_2(tiny_llama_dir, capsys):
    """(`--enable-eplb` on a dense model: test_moe_ep's eplb-on-dense case.)"""
    status, stderr = generate_exit(
        capsys, "--model", str(tiny_llama_dir), "--device", "cpu", "--ep-size", "3"
    )
    assert status == 2, stderr
    assert "needs a mixture-of-experts model" in stderr
    assert "Loading weights" not in stderr


def test_router_skew_concentrates_the_recorded_load_and_metrics_report_it(qwen3_moe):
    prompts = make_prompts(512)[:6]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    peaks = []
    for skew in (0.0, 3.0):
        settings = dict(expert_distribution_recorder_mode="stat", moe_router_skew=skew)
        with LLM(str(qwen3_moe), dtype="float32", device="cpu", **settings) as llm:
            llm.generate(prompts, params)
            load = llm.engine.moe.recorder.load()
            metrics = llm.engine.moe.metrics()
            report = llm.engine.moe.report()
        peaks.append(float((load.max(dim=1).values / load.mean(dim=1)).mean()))
        assert set(metrics) == {"eplb_balancedness", "eplb_rebalances"}
        assert report["placement"] == "static" and report["router_skew"] == skew
    assert peaks[1] > peaks[0] * 1.5, peaks
