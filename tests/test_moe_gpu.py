"""MoE models on CUDA: greedy output of a tiny Qwen3-MoE checkpoint equals transformers' on
the same GPU (float32), with decode CUDA graphs (batch sizes whose (token, expert) pairs take
the sync-free gathered path) and with EPLB rebalancing redundant experts every 2 steps."""

from __future__ import annotations

import pytest
import torch
from fixtures.devices import GPU_ENGINE
from fixtures.tiny_moe import build_tiny_moe
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams
from test_engine_parity import assert_same_tokens, hf_reference, make_prompts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model_dir = build_tiny_moe(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")
    prompts = make_prompts(512)[:8]
    return model_dir, prompts, hf_reference(model_dir, prompts, 10)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"cuda_graph_max_bs": 8}, id="cuda-graphs"),
        pytest.param(
            {
                "expert_placement": "eplb",
                "ep_num_redundant_experts": 4,
                "eplb_rebalance_num_iterations": 2,
                "cuda_graph_max_bs": 8,
            },
            id="eplb-redundant",
        ),
    ],
)
def test_greedy_equals_transformers_on_cuda(case, settings):
    model_dir, prompts, reference = case
    params = SamplingParams(max_tokens=10, temperature=0.0)
    with LLM(str(model_dir), dtype="float32", **GPU_ENGINE, **settings) as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.runner.cuda_graphs is not None, llm.engine.runner.cuda_graph_off_reason
    assert_same_tokens(outs, reference)
