"""GEMV kernels of decode (`pegboard.core.kernels.gemv`) against `F.linear`, and the model's
linear layers and LM head running them.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on small shapes: float32 must equal a float64 reference to float32
rounding; bf16 (element-wise kernel only: the interpreter multiplies bf16 as integers inside
`tl.dot`) to bf16 rounding. The `gpu` tests run every measured configuration at its real shape
in bf16, and a CUDA graph capture.
"""

from __future__ import annotations

import os

import pytest
import torch
from fixtures.spies import record_configs
from torch.nn import functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import dense  # noqa: E402
from pegboard.core.kernels import gemv as gemv_module  # noqa: E402
from pegboard.core.kernels.gemv import MAX_ROWS, GemvConfig, gemv, linear  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models.layers import Linear  # noqa: E402
from test_fused_kernels import prefill_logits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ELEMENTWISE = GemvConfig(block_n=4, block_k=64)
SPLIT = GemvConfig(block_n=2, block_k=32, split_k=3)
DOT = GemvConfig(block_n=16, block_k=32, dot=True)
DOT_SPLIT = GemvConfig(block_n=16, block_k=64, split_k=2, dot=True)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# ------------------------------------------------------------------ kernels, CPU interpreter


@pytest.mark.parametrize(
    "config", [ELEMENTWISE, SPLIT, DOT, DOT_SPLIT], ids=["gemv", "split", "dot", "dot-split"]
)
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_equals_linear_with_ragged_blocks(config, rows):
    # N = 37 leaves the last row block partly empty; K = 200 is no multiple of the K blocks.
    x, w, b = randn(rows, 200), randn(37, 200, seed=1), randn(37, seed=2)
    out = gemv(x, w, b, config)
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    assert relative_error(out, reference(x, w, b)) < 1e-6


def test_gemv_keeps_leading_dimensions_and_strided_rows():
    x = randn(2, 3, 2 * 96)[..., :96]  # rows 192 apart, unit stride along K
    w = randn(40, 96, seed=1)
    out = gemv(x, w, None, ELEMENTWISE)
    assert out.shape == (2, 3, 40)
    assert relative_error(out, reference(x, w, None)) < 1e-6


@pytest.mark.parametrize("config", [ELEMENTWISE, SPLIT], ids=["gemv", "split"])
def test_gemv_bf16_matches_float_reference(config):
    x = randn(2, 256, dtype=torch.bfloat16)
    w, b = randn(24, 256, dtype=torch.bfloat16, seed=1), randn(24, dtype=torch.bfloat16, seed=2)
    out = gemv(x, w, b, config)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference(x, w, b)) < 1e-2


def test_gemv_rejects_a_strided_weight():
    w = randn(16, 128, seed=1)[:, :64]
    with pytest.raises(ValueError, match="contiguous"):
        gemv(randn(1, 64), w, None, ELEMENTWISE)


# ------------------------------------------------------------------ dispatch


@pytest.fixture
def gemv_calls(monkeypatch):
    """The configurations `linear` ran `gemv` with."""
    return record_configs(monkeypatch, gemv_module, "gemv")


def test_linear_runs_the_configuration_of_the_shape_and_row_bucket(decode_configs, gemv_calls):
    one_row = GemvConfig(block_n=2, block_k=32)
    decode_configs[(torch.float32, 24, 64)] = {1: one_row, 4: ELEMENTWISE}
    w = randn(24, 64, seed=1)
    for rows, expected in [(1, [one_row]), (3, [one_row, ELEMENTWISE])]:
        x = randn(rows, 64)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert gemv_calls == expected


def test_linear_writes_into_out_through_gemv_and_cublas(decode_configs):
    """A tensor-parallel projection writes its output straight into a slot of the symmetric
    buffer: row bucket 1 through the GEMV kernel, bucket 2 through cuBLAS (`torch.addmm`)."""
    decode_configs[(torch.float32, 24, 64)] = {1: GemvConfig(block_n=2, block_k=32), 2: None}
    w, bias = randn(24, 64, seed=1), randn(24, seed=2)
    for rows in (1, 2):
        x = randn(rows, 64)
        buffer = torch.zeros(2, 4, 24, device=x.device)
        linear(x, w, bias, out=buffer[1, :rows])
        torch.testing.assert_close(buffer[1, :rows], F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        assert not buffer[0].any() and not buffer[1, rows:].any()


def test_linear_falls_back_to_cublas(decode_configs, gemv_calls):
    decode_configs[(torch.float32, 24, 64)] = {1: ELEMENTWISE, 2: None, 8: ELEMENTWISE}
    w = randn(24, 64, seed=1)
    for x in [
        randn(2, 64),  # cuBLAS measured faster for this bucket
        randn(9, 64),  # more rows than MAX_ROWS
        randn(0, 64),
    ]:
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=0, rtol=0)
    x = randn(1, 64)
    strided = randn(24, 128, seed=1)[:, :64]
    torch.testing.assert_close(linear(x, strided), F.linear(x, strided), atol=0, rtol=0)
    assert linear(randn(1, 48), randn(24, 48)).shape == (1, 24)  # no entry for this shape
    assert linear(x.double(), w.double()).dtype == torch.float64  # nor for this dtype
    assert gemv_calls == []


def test_disable_gemv_keeps_f_linear_with_fused_kernels_on(monkeypatch):
    layer = Linear(64, 24)
    monkeypatch.setenv("PEGBOARD_DISABLE_GEMV", "1")
    layer.set_fused_kernels(True)
    assert layer.kernel is None
    monkeypatch.setenv("PEGBOARD_DISABLE_GEMV", "0")
    layer.set_fused_kernels(True)
    assert layer.kernel is dense.linear
    layer.set_fused_kernels(False)
    assert layer.kernel is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_with_gemv_equals_the_pytorch_decoder(
    tiny_model_dirs, arch, decode_configs, gemv_calls
):
    runner = ModelRunner(tiny_model_dirs[arch], "float32", str(DEVICE), progress=False)
    model = runner.model
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear)}
    for n, k in shapes:
        decode_configs[(torch.float32, n, k)] = dict.fromkeys([1, 2, 4, 8], GemvConfig(8, 64))
    prompts = [[5, 9, 200, 17], [300, 2, 77]]  # 7 tokens: every layer runs as GEMV
    model.set_fused_kernels(False)
    expected = prefill_logits(runner, prompts)
    model.set_fused_kernels(True)
    assert model.gemv_kernels
    torch.testing.assert_close(prefill_logits(runner, prompts), expected, atol=1e-4, rtol=1e-4)
    layers = model.config.num_layers
    assert len(gemv_calls) == 4 * layers + 1  # qkv, o, gate_up, down per layer; the LM head


# ------------------------------------------------------------------ GPU, bf16, real shapes


def measured_cases() -> list[tuple[int, int, int, GemvConfig]]:
    """(rows, N, K, config) for every bf16 configuration in DECODE_CONFIGS, at the smallest
    and largest row count of its bucket."""
    cases = []
    for (dtype, n, k), by_rows in gemv_module.DECODE_CONFIGS.items():
        for bucket, config in by_rows.items():
            if dtype == torch.bfloat16 and config is not None:
                cases += [(rows, n, k, config) for rows in sorted({bucket // 2 + 1, bucket})]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k", "config"), measured_cases())
def test_gpu_measured_configs_match_float32(rows, n, k, config):
    x = randn(rows, k, dtype=torch.bfloat16, seed=rows)
    w = randn(n, k, dtype=torch.bfloat16, seed=n + k)
    b = randn(n, dtype=torch.bfloat16, seed=3)
    for bias in (None, b):
        torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        out = gemv(x, w, bias, config)  # in the freed NaN block: every element must be written
        assert relative_error(out, reference(x, w, bias)) < 1e-2
        assert relative_error(out, F.linear(x, w, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", [GemvConfig(4, 2048), GemvConfig(4, 1024, split_k=4), DOT])
def test_gpu_gemv_is_captured_in_a_cuda_graph_without_synchronising(config):
    x = randn(2, 4096, dtype=torch.bfloat16)
    w = randn(4096, 4096, dtype=torch.bfloat16, seed=1)
    expected = gemv(x, w, None, config)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = gemv(x, w, None, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.copy_(randn(2, 4096, dtype=torch.bfloat16, seed=7))
    graph.replay()
    torch.testing.assert_close(out, gemv(x, w, None, config), atol=0, rtol=0)
    assert not torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graph_decode_with_gemv_equals_eager_decode(tiny_llama_dir, dtype, monkeypatch):
    from test_cuda_graph import _prompts

    used: list[tuple[int, int]] = []

    def every_shape(rows, weight):  # the element-wise kernel for 1-2 rows, tensor cores above
        used.append((rows, weight.shape[0]))
        return ELEMENTWISE if rows <= 2 else DOT if rows <= MAX_ROWS else None

    monkeypatch.setattr(gemv_module, "decode_config", every_shape)
    # decode at 3 and, as requests finish, fewer rows
    runner = assert_graph_decode_equals_eager_decode(tiny_llama_dir, _prompts(3), dtype)
    assert runner.model.gemv_kernels and {rows for rows, _ in used} >= {1, 2, 3, 4}


def assert_graph_decode_equals_eager_decode(model_dir, prompts, dtype: str) -> ModelRunner:
    """Greedy decode with CUDA graphs (triton attention) gives the tokens of eager decode and,
    in float32, of the decoder without fused kernels; the graph run's model runner."""
    from test_cuda_graph import _generate

    graphed, graphs, runner = _generate(model_dir, prompts, attention="triton", dtype=dtype)
    assert runner.cuda_graphs is not None and graphs[0].num_replays >= 15
    eager, _, _ = _generate(
        model_dir, prompts, attention="triton", dtype=dtype, disable_cuda_graph=True
    )
    assert graphed == eager
    if dtype == "float32":
        plain, _, _ = _generate(
            model_dir, prompts, attention="triton", dtype=dtype, disable_fused_kernels=True
        )
        assert graphed == plain
    return runner
