"""MoE models through the fused MoE kernel (`--moe-kernel`, `pegboard.core.moe.kernel`).

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported) when selected explicitly: a tiny Qwen3-MoE's float32 greedy output equals
transformers'. `auto` picks the PyTorch path on CPU, and `triton` without a way to run it is
a clear error. On a GPU (`gpu` tests) the fused kernel is the default: greedy output equals
transformers' in float32 with decode CUDA graphs at batch sizes the PyTorch path cannot
capture, and in bf16 its logits stay as close to the PyTorch path's as bf16 allows.
"""

from __future__ import annotations

import os

import pytest
import torch
from fixtures.devices import GPU_ENGINE

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.tiny_moe import build_tiny_moe  # noqa: E402
from pegboard.core.kernels.fused_moe import fused_experts  # noqa: E402
from pegboard.core.kernels.fused_moe_topk import softmax_topk  # noqa: E402
from pegboard.core.llm import LLM  # noqa: E402
from pegboard.core.models.moe import moe_blocks  # noqa: E402
from pegboard.core.moe.flags import MoEFlagError  # noqa: E402
from pegboard.core.moe.kernel import select_moe_kernel  # noqa: E402
from pegboard.sdk.types import SamplingParams  # noqa: E402
from test_engine_parity import assert_same_tokens, hf_reference, make_prompts  # noqa: E402
from test_fused_kernels import prefill_logits  # noqa: E402
from test_models import make_runner  # noqa: E402


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


def kernels_of(model) -> set:
    """The expert and router kernels of the model's sparse layers."""
    return {(block.experts.kernel, block.router_kernel) for block in moe_blocks(model)}


@pytest.fixture(
    scope="module",
    params=["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)],
)
def any_moe_dir(request, moe_dir, tmp_path_factory):
    """Qwen3-MoE (model dtype routing weights) and Mixtral (float32 ones, renormalised)."""
    if request.param == "qwen3_moe":
        return moe_dir
    return build_tiny_moe(tmp_path_factory.mktemp(request.param), request.param)


def test_tiny_moe_through_the_fused_kernels_equals_transformers_on_cpu(any_moe_dir):
    moe_dir = any_moe_dir
    prompts = make_prompts(512)[:2]
    reference = hf_reference(moe_dir, prompts, 4)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with LLM(str(moe_dir), dtype="float32", device="cpu", moe_kernel="triton") as llm:
        assert kernels_of(llm.engine.runner.model) == {(fused_experts, softmax_topk)}
        assert llm.engine.moe.report()["kernel"] == "triton"
        outs = llm.generate(prompts, params)
    assert_same_tokens(outs, reference)


def test_auto_and_torch_keep_the_pytorch_path_on_cpu(moe_dir):
    runner, _ = make_runner(moe_dir, page_size=4)
    assert select_moe_kernel(runner.model, "triton") == "triton"  # the interpreter is on
    assert select_moe_kernel(runner.model, "auto") == "torch"
    assert kernels_of(runner.model) == {(None, None)}
    select_moe_kernel(runner.model, "triton")
    assert select_moe_kernel(runner.model, "torch") == "torch"
    assert kernels_of(runner.model) == {(None, None)}


def test_triton_where_it_cannot_run_is_a_clear_error(moe_dir, monkeypatch):
    runner, _ = make_runner(moe_dir, page_size=4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MoEFlagError, match="--moe-kernel triton: .*CUDA device"):
        select_moe_kernel(runner.model, "triton")
    with pytest.raises(MoEFlagError, match="choose one of auto, triton, torch"):
        select_moe_kernel(runner.model, "cutlass")


def test_a_dense_model_has_no_expert_kernel(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir, page_size=4)
    assert select_moe_kernel(runner.model, "triton") is None


def test_a_nan_row_is_routed_in_range_and_leaves_the_other_rows_alone(moe_dir):
    # A decode CUDA graph's padded rows attend to no keys (0 / 0): their hidden states are NaN.
    # The torch router ranks NaN first; the fused one gave expert id E, which indexed past the
    # placement table (a device-side assert on the GPU, an IndexError here).
    runner, _ = make_runner(moe_dir, page_size=4)
    block = moe_blocks(runner.model)[0]
    x = torch.randn(3, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    x[1] = float("nan")
    select_moe_kernel(runner.model, "torch")
    expected = block(x)
    select_moe_kernel(runner.model, "triton")
    out = block(x)
    assert out[1].isnan().all() and expected[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]])


# ------------------------------------------------------------------ GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_fused_kernel_is_the_default_on_cuda_and_graphs_capture_large_batches(moe_dir):
    # 35 prompts decode at batch size 35: 70 (token, expert) pairs, more than the PyTorch
    # path's sync-free limit (GATHER_MAX_PAIRS), so only the fused kernel captures them; the
    # graph of 40 runs 5 padded rows (NaN hidden states: no keys), routed in range.
    prompts = make_prompts(512, seed=3)[:7] * 5
    reference = hf_reference(moe_dir, prompts[:7], 8)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    with LLM(str(moe_dir), dtype="float32", cuda_graph_max_bs=48, **GPU_ENGINE) as llm:
        runner = llm.engine.runner
        assert kernels_of(runner.model) == {(fused_experts, softmax_topk)}
        assert runner.cuda_graphs is not None, runner.cuda_graph_off_reason
        assert 48 in runner.cuda_graphs.graphs
        outs = llm.generate(prompts, params)
        assert runner.cuda_graphs.num_replays > 0
    assert_same_tokens(outs, reference * 5)


@pytest.mark.gpu
@gpu
def test_bf16_logits_of_the_fused_kernel_are_as_close_as_the_torch_path(moe_dir):
    prompts = make_prompts(512, seed=5)[:6]
    runner, _ = make_runner(moe_dir, page_size=4, device="cuda", dtype="float32")
    oracle = prefill_logits(runner, prompts).double()
    bf16, _ = make_runner(moe_dir, page_size=4, device="cuda", dtype="bfloat16")
    select_moe_kernel(bf16.model, "torch")
    torch_logits = prefill_logits(bf16, prompts).double()
    select_moe_kernel(bf16.model, "triton")
    fused_logits = prefill_logits(bf16, prompts).double()

    def error(logits):
        return ((logits - oracle).norm() / oracle.norm()).item()

    assert error(fused_logits) <= 1.5 * error(torch_logits) + 1e-3
    agree = (fused_logits.argmax(-1) == torch_logits.argmax(-1)).float().mean().item()
    assert agree >= 5 / 6
