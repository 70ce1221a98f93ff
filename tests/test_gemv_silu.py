"""SiLU-and-mul in the gate/up GEMV's epilogue (`gemv(..., silu_out=True)`, `gemv_silu`,
`dense.silu_gate_up`, `PEGBOARD_FUSED_SILU_GATE_UP`): bit for bit `activation.silu_and_mul`
after the gate/up GEMV, and the decoder with the switch on gives the logits of the switch off
without a separate SiLU-and-mul launch.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes; the `gpu` tests run
the measured gate/up configurations at their real shapes and a graph-captured decode.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import activation, dense  # noqa: E402
from pegboard.core.kernels import gemv as gemv_module  # noqa: E402
from pegboard.core.kernels.gemv import GemvConfig, gemv  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from test_gemv import DEVICE, DOT, ELEMENTWISE, SPLIT, randn  # noqa: E402
from test_silu_down import check_switch_drops_silu_and_mul, separate_calls  # noqa: E402, F401

CONFIGS = [GemvConfig(2, 64), ELEMENTWISE, GemvConfig(8, 128, num_warps=2)]


def x_and_weight(rows: int, inter: int, k: int, dtype: torch.dtype):
    """x and a gate/up weight whose gates straddle SiLU's bend (products round in bf16)."""
    x = randn(rows, k, dtype=torch.float32, seed=rows).to(dtype)
    w = randn(2 * inter, k, dtype=torch.float32, seed=7).mul(0.3).to(dtype)
    return x, w


@pytest.mark.parametrize("config", CONFIGS, ids=["bn2", "bn4", "bn8"])
@pytest.mark.parametrize(("rows", "dtype"), [(1, torch.bfloat16), (3, torch.bfloat16),
                                             (2, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_silu_out_equals_gemv_then_silu_and_mul_bit_for_bit(config, rows, dtype, bias):
    # I = 37: the last program's gate and up rows run past the half; K = 200: no whole block
    x, w = x_and_weight(rows, 37, 200, dtype)
    b = randn(74, dtype=dtype, seed=2) if bias else None
    expected = activation.silu_and_mul(gemv(x, w, b, config))
    out = gemv(x, w, b, config, silu_out=True)
    assert out.shape == (rows, 37) and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_silu_out_keeps_leading_dimensions():
    x, w = x_and_weight(2, 16, 64, torch.bfloat16)
    out = gemv(x.view(2, 1, 64), w, None, ELEMENTWISE, silu_out=True)
    assert out.shape == (2, 1, 16)
    expected = activation.silu_and_mul(gemv(x, w, None, ELEMENTWISE))
    torch.testing.assert_close(out.view(2, 16), expected, atol=0, rtol=0)


@pytest.mark.parametrize("config", [DOT, SPLIT, GemvConfig(3, 64)], ids=["dot", "split", "odd"])
def test_silu_out_refuses_configs_it_does_not_run(config):
    x, w = x_and_weight(1, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="silu_out needs an element-wise, unsplit config"):
        gemv(x, w, None, config, silu_out=True)


def test_dense_silu_gate_up_only_where_the_gemv_takes_the_rows(decode_configs):
    x, w = x_and_weight(3, 16, 64, torch.float32)
    assert dense.silu_gate_up(x, w) is None  # no configuration for the shape: cuBLAS
    decode_configs[(torch.float32, 32, 64)] = {1: ELEMENTWISE, 2: ELEMENTWISE, 4: DOT, 8: SPLIT}
    expected = activation.silu_and_mul(gemv(x[:2], w, None, ELEMENTWISE))
    torch.testing.assert_close(dense.silu_gate_up(x[:2], w), expected, atol=0, rtol=0)
    assert dense.silu_gate_up(x, w) is None  # 3 rows: the tensor-core config
    assert dense.silu_gate_up(x.repeat(3, 1), w) is None  # 9 rows: past the GEMV


def test_decoder_with_silu_in_gate_up_equals_it_without(
    tiny_llama_dir,
    decode_configs,
    separate_calls,  # noqa: F811
    monkeypatch,
):
    check_switch_drops_silu_and_mul(
        tiny_llama_dir, decode_configs, separate_calls, monkeypatch, "PEGBOARD_FUSED_SILU_GATE_UP"
    )


def test_switch_is_off_by_default(tiny_llama_dir, monkeypatch):
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    mlp = runner.model.model.layers[0].mlp
    monkeypatch.delenv("PEGBOARD_FUSED_SILU_GATE_UP", raising=False)
    runner.model.set_fused_kernels(True)
    assert mlp.silu_gate_up is None
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_GATE_UP", "1")
    runner.model.set_fused_kernels(True)
    assert mlp.silu_gate_up is dense.silu_gate_up


# ------------------------------------------------------------------ GPU, bf16, real shapes


def gate_up_cases() -> list[tuple[int, int, int, GemvConfig]]:
    """(rows, N, K, config) of every measured bf16 gate/up configuration the epilogue runs
    (Llama-3.1-8B at TP=1 and TP=2, Qwen3-0.6B)."""
    gate_ups = {(28672, 4096), (14336, 4096), (6144, 1024)}
    cases = []
    for (dtype, n, k), by_rows in gemv_module.DECODE_CONFIGS.items():
        for bucket, config in by_rows.items():
            if dtype != torch.bfloat16 or (n, k) not in gate_ups or config is None:
                continue
            if not config.dot and config.split_k == 1 and config.block_n % 2 == 0:
                cases += [(rows, n, k, config) for rows in sorted({bucket // 2 + 1, bucket})]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k", "config"), gate_up_cases())
def test_gpu_measured_gate_up_configs_bit_for_bit(rows, n, k, config):
    x, w = x_and_weight(rows, n // 2, k, torch.bfloat16)
    expected = activation.silu_and_mul(gemv(x, w, None, config))
    torch.testing.assert_close(gemv(x, w, None, config, silu_out=True), expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_graph_decode_with_silu_in_gate_up_equals_unfused(
    tiny_llama_dir,
    separate_calls,  # noqa: F811
    monkeypatch,
):
    """Greedy tokens of a CUDA-graph decode (3 requests, then fewer) with the switch on equal
    those with it off; the fused path was captured (no separate SiLU-and-mul at 1-2 rows)."""
    from test_cuda_graph import _generate, _prompts

    def every_shape(rows, weight):  # the element-wise kernel for 1-2 rows, tensor cores above
        return ELEMENTWISE if rows <= 2 else DOT if rows <= gemv_module.MAX_ROWS else None

    monkeypatch.setattr(gemv_module, "decode_config", every_shape)
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "0")
    unfused, _, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype="bfloat16")
    assert 1 in separate_calls
    separate_calls.clear()
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_GATE_UP", "1")
    fused, graphs, runner = _generate(
        tiny_llama_dir, _prompts(3), attention="triton", dtype="bfloat16"
    )
    assert runner.cuda_graphs is not None and graphs[0].num_replays >= 15
    assert fused == unfused
    assert 1 not in separate_calls and 2 not in separate_calls
