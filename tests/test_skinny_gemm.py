"""The skinny GEMM of decode batches (`pegboard.core.kernels.skinny_gemm`) against `F.linear`,
its measured table, and `dense.linear` choosing GEMV / skinny GEMM / cuBLAS by rows.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on small shapes in float32 (the interpreter multiplies bf16 as integers
inside `tl.dot`, so bf16 is checked on the GPU only). The `gpu` tests run the real Qwen3-0.6B
and Llama-3.1-8B shapes at several M in bf16, every entry of a measured table, a CUDA graph
capture, and graph decode of a tiny model with the kernel forced at every shape.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures.spies import record_configs
from torch.nn import functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import dense, skinny_gemm  # noqa: E402
from pegboard.core.kernels import gemv as gemv_module  # noqa: E402
from pegboard.core.kernels.skinny_gemm import SkinnyConfig  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models.layers import Linear  # noqa: E402
from test_fused_kernels import prefill_logits  # noqa: E402
from test_gemv import (  # noqa: E402
    assert_graph_decode_equals_eager_decode,
    randn,
    reference,
    relative_error,
)

DEVICE = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as weights say it
PLAIN = SkinnyConfig(block_m=16, block_n=32, block_k=32)
SWAP = SkinnyConfig(block_m=16, block_n=32, block_k=32, swap=True)
PLAIN_SPLIT = SkinnyConfig(block_m=32, block_n=16, block_k=64, split_k=3)
SWAP_SPLIT = SkinnyConfig(block_m=16, block_n=64, block_k=32, split_k=2, swap=True)
CONFIG_IDS = ["plain", "swap", "plain-split", "swap-split"]


# ------------------------------------------------------------------ kernel, CPU interpreter


@pytest.mark.parametrize("config", [PLAIN, SWAP, PLAIN_SPLIT, SWAP_SPLIT], ids=CONFIG_IDS)
@pytest.mark.parametrize("rows", [9, 21])
def test_skinny_gemm_equals_linear_with_ragged_blocks(config, rows):
    # N = 37 leaves the last column block partly empty; K = 200 is no multiple of the K steps;
    # 21 rows leave the last row block of 16 partly empty.
    x, w, b = randn(rows, 200), randn(37, 200, seed=1), randn(37, seed=2)
    out = skinny_gemm.skinny_gemm(x, w, b, config)
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, w, b), atol=1e-4, rtol=1e-5)
    no_bias = skinny_gemm.skinny_gemm(x, w, None, config)
    torch.testing.assert_close(no_bias.double(), reference(x, w, None), atol=1e-4, rtol=1e-5)


def test_skinny_gemm_keeps_leading_dimensions_and_strided_rows():
    x = randn(3, 5, 128)[:, :, :96]  # 15 rows, each a strided view
    w = randn(40, 96, seed=1)
    out = skinny_gemm.skinny_gemm(x, w, None, SWAP_SPLIT)
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out.double(), reference(x, w, None), atol=1e-4, rtol=1e-5)


def test_skinny_gemm_rejects_a_strided_weight_and_tiles_below_16():
    with pytest.raises(ValueError, match="contiguous"):
        skinny_gemm.skinny_gemm(randn(9, 64), randn(24, 128)[:, :64], None, PLAIN)
    with pytest.raises(ValueError, match="at least 16"):
        skinny_gemm.skinny_gemm(randn(9, 64), randn(24, 64), None, SkinnyConfig(16, 8, 32))


# ------------------------------------------------------------------ the measured table


def test_rows_buckets_are_powers_of_two_from_16_for_9_to_256_rows():
    assert [skinny_gemm.rows_bucket(r) for r in (8, 9, 16, 17, 64, 65, 129, 256, 257)] == [
        None, 16, 16, 32, 64, 128, 256, 256, None,
    ]  # fmt: skip


def test_table_entries_are_read_for_their_device_only(tmp_path, monkeypatch):
    entry = skinny_gemm.table_entry(SWAP_SPLIT)
    table = {"NVIDIA H200": {"bfloat16": {"1024x2048": {"16": entry, "256": None}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(skinny_gemm.TABLE_ENV, str(path))
    assert skinny_gemm.table_path() == path
    configs = skinny_gemm.parse_table(skinny_gemm.read_table(path), "NVIDIA H200")
    assert configs == {(torch.bfloat16, 1024, 2048): {16: SWAP_SPLIT, 256: None}}
    # a table measured on another device changes nothing here
    assert skinny_gemm.parse_table(table, "NVIDIA H100 80GB HBM3") == {}


@pytest.mark.parametrize("value", ["off", "0", "none", ""])
def test_the_table_can_be_switched_off(monkeypatch, value):
    monkeypatch.setenv(skinny_gemm.TABLE_ENV, value)
    assert skinny_gemm.table_path() is None
    assert skinny_gemm.read_table(None) == {}


def test_a_malformed_table_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        skinny_gemm.read_table(path)


def test_a_cpu_device_has_no_measured_configs(monkeypatch):
    monkeypatch.setattr(skinny_gemm, "_by_device", {})
    assert skinny_gemm.device_configs(torch.device("cpu")) == {}
    assert skinny_gemm.measured_config(64, torch.empty(1024, 2048)) is None


# ------------------------------------------------------------------ dispatch


@pytest.fixture
def table(monkeypatch):
    """This device's measured configurations, empty, for a test to fill."""
    configs: dict = {}
    monkeypatch.setattr(skinny_gemm, "_by_device", {DEVICE: configs})
    return configs


@pytest.fixture
def skinny_calls(monkeypatch):
    """The configurations `dense.linear` ran the skinny GEMM with."""
    return record_configs(monkeypatch, skinny_gemm, "skinny_gemm")


def test_dense_linear_runs_the_configuration_of_the_shape_and_row_bucket(table, skinny_calls):
    table[(torch.float32, 24, 64)] = {16: PLAIN, 32: SWAP, 256: SWAP_SPLIT}
    w, b = randn(24, 64, seed=1), randn(24, seed=2)
    for rows, expected in [(9, PLAIN), (16, PLAIN), (30, SWAP), (200, SWAP_SPLIT)]:
        x = randn(rows, 64)
        torch.testing.assert_close(dense.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        assert skinny_calls[-1] == expected
    assert len(skinny_calls) == 4


def test_dense_linear_keeps_cublas_where_the_table_has_nothing(table, skinny_calls, monkeypatch):
    monkeypatch.setattr(gemv_module, "DECODE_CONFIGS", {})
    table[(torch.float32, 24, 64)] = {16: PLAIN, 64: None}
    w = randn(24, 64, seed=1)
    for x in [
        randn(8, 64),  # the GEMV's rows (no GEMV entry either: cuBLAS)
        randn(40, 64),  # cuBLAS measured as fast for this bucket
        randn(100, 64),  # no entry for this bucket
        randn(257, 64),  # past the skinny GEMM's rows (prefill)
    ]:
        torch.testing.assert_close(dense.linear(x, w), F.linear(x, w), atol=0, rtol=0)
    strided = randn(24, 128, seed=1)[:, :64]
    x = randn(12, 64)
    torch.testing.assert_close(dense.linear(x, strided), F.linear(x, strided), atol=0, rtol=0)
    assert dense.linear(randn(12, 48), randn(24, 48)).shape == (12, 24)  # no entry: this shape
    assert dense.linear(x.double(), w.double()).dtype == torch.float64  # nor this dtype
    assert skinny_calls == []


def test_dense_linear_writes_into_out_at_every_row_count(table, skinny_calls):
    # a tensor-parallel o/down projection hands its symmetric buffer as `out`
    # (core/distributed/fused_norm.py): written there, whichever rows, never reallocated
    table[(torch.float32, 24, 64)] = {16: PLAIN}
    w, b = randn(24, 64, seed=1), randn(24, seed=2)
    for rows in (1, 9, 300):
        x, out = randn(rows, 64), torch.full((rows, 24), float("nan"))
        result = dense.linear(x, w, b, out=out)
        assert result.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_with_skinny_gemm_equals_the_pytorch_decoder(
    tiny_model_dirs, arch, table, skinny_calls
):
    runner = ModelRunner(tiny_model_dirs[arch], "float32", str(DEVICE), progress=False)
    model = runner.model
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear)}
    for n, k in shapes:
        table[(torch.float32, n, k)] = {16: SWAP_SPLIT, 32: PLAIN_SPLIT}
    prompts = [[5, 9, 200, 17, 33, 8, 41, 2, 90, 11, 7, 60], [300, 2, 77, 4, 5, 6, 7, 8, 9]]
    model.set_fused_kernels(False)
    expected = prefill_logits(runner, prompts)
    model.set_fused_kernels(True)
    torch.testing.assert_close(prefill_logits(runner, prompts), expected, atol=1e-4, rtol=1e-4)
    # 21 prompt tokens through qkv, o, gate_up, down of every layer; the LM head's 2 rows not
    assert skinny_calls == [PLAIN_SPLIT] * (4 * model.config.num_layers)


# ------------------------------------------------------------------ GPU, bf16, real shapes

QWEN3 = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down
LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
GPU_CONFIGS = [
    SkinnyConfig(16, 64, 128, split_k=4, swap=True),
    SkinnyConfig(64, 128, 64, split_k=2, swap=True, num_stages=4),
    SkinnyConfig(64, 64, 128, split_k=2),
    SkinnyConfig(128, 64, 128, num_warps=8),
]


def check_bf16(rows: int, n: int, k: int, config: SkinnyConfig) -> None:
    x = randn(rows, k, dtype=torch.bfloat16, seed=rows)
    w = randn(n, k, dtype=torch.bfloat16, seed=n + k)
    b = randn(n, dtype=torch.bfloat16, seed=3)
    for bias in (None, b):
        torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        out = skinny_gemm.skinny_gemm(x, w, bias, config)  # in the freed NaN block
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert relative_error(out, reference(x, w, bias)) < 1e-2
        assert relative_error(out, F.linear(x, w, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}")
@pytest.mark.parametrize("rows", [9, 24, 64, 256])
@pytest.mark.parametrize(("n", "k"), QWEN3 + LLAMA, ids=[f"{n}x{k}" for n, k in QWEN3 + LLAMA])
def test_gpu_real_shapes_match_float32(n, k, rows, config):
    check_bf16(rows, n, k, config)


def measured_cases() -> list[tuple[int, int, int, SkinnyConfig]]:
    """(rows, N, K, config) for every bf16 configuration of this device's measured table, at
    the smallest and largest row count of its bucket."""
    if not torch.cuda.is_available():
        return []
    cases = []
    for (dtype, n, k), by_bucket in skinny_gemm.device_configs(DEVICE).items():
        for bucket, config in by_bucket.items():
            if dtype == torch.bfloat16 and config is not None:
                low = max(skinny_gemm.MIN_ROWS, bucket // 2 + 1)
                cases += [(rows, n, k, config) for rows in sorted({low, bucket})]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k", "config"), measured_cases())
def test_gpu_measured_configs_match_float32(rows, n, k, config):
    check_bf16(rows, n, k, config)


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS[:3], ids=lambda c: f"{c.block_m}x{c.block_n}")
def test_gpu_skinny_gemm_is_captured_in_a_cuda_graph_without_synchronising(config):
    x = randn(48, 2048, dtype=torch.bfloat16)
    w = randn(1024, 2048, dtype=torch.bfloat16, seed=1)
    expected = skinny_gemm.skinny_gemm(x, w, None, config)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = skinny_gemm.skinny_gemm(x, w, None, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.copy_(randn(48, 2048, dtype=torch.bfloat16, seed=7))
    graph.replay()
    torch.testing.assert_close(out, skinny_gemm.skinny_gemm(x, w, None, config), atol=0, rtol=0)
    assert not torch.equal(out, expected)


TINY_SWAP = SkinnyConfig(16, 64, 32, split_k=2, swap=True)  # K = 64, 128: split in two or four
TINY_PLAIN = SkinnyConfig(64, 64, 32, split_k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graph_decode_with_skinny_gemm_equals_eager_decode(tiny_llama_dir, dtype, monkeypatch):
    from test_cuda_graph import _prompts

    used: list[int] = []

    def every_shape(rows, weight):  # both orientations, split K, at every row count it takes
        if skinny_gemm.rows_bucket(rows) is None:
            return None
        used.append(rows)
        return TINY_SWAP if rows <= 32 else TINY_PLAIN

    monkeypatch.setattr(skinny_gemm, "measured_config", every_shape)
    # decode at 17 rows (the 24-row graph); the prefill, 163 tokens, replays a mixed graph
    assert_graph_decode_equals_eager_decode(tiny_llama_dir, _prompts(17), dtype)
    assert 24 in used and max(used) > 64
