"""W4A16 calls of many rows through a de-quantized bf16 buffer and cuBLAS
(`pegboard.core.kernels.w4a16_dequant`, the w4a16 plugin's `--w4a16-dequant-min-rows`).

Without a GPU the de-quantizing kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set
here before Triton is imported): it must write exactly `int4.dequantize_packed`'s matrix, and a
quantized model's layers must send the calls of at least `dequant_min_rows` rows through it and
the others through the W4A16 kernels, every layer writing into one buffer sized for the
largest. The `gpu` tests run it in bf16 on Llama-3.1-8B's shapes and in a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures import int4_layers  # noqa: E402
from fixtures.int4_layers import rel_error  # noqa: E402
from pegboard.core.kernels.w4a16_dequant import dequant_linear, dequantize_into  # noqa: E402
from pegboard.plugins.linear.int4 import dequantize_packed  # noqa: E402
from torch.nn import functional as F  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_layer(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0, offsets="asym"):
    return int4_layers.packed_layer(n, k, group, dtype, offsets, seed, DEVICE)


@pytest.mark.parametrize("offsets", ["asym", "sym", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k", "group"), [(48, 64, 32), (200, 256, 64), (40, 384, 128)])
def test_the_kernel_writes_exactly_the_dequantized_matrix(n, k, group, dtype, offsets):
    # N and K not multiples of the kernel's blocks: the masked edges are written too.
    p = packed_layer(n, k, group, dtype, offsets=offsets)
    out = torch.full((k * n + 7,), float("nan"), dtype=dtype, device=DEVICE)
    w = dequantize_into(out, p.qweight, p.scales, p.offsets, group)
    assert w.shape == (k, n) and w.data_ptr() == out.data_ptr()
    assert torch.equal(w, dequantize_packed(p, dtype).t())


def test_per_channel_weights_are_one_group_of_k():
    p = packed_layer(24, 96, 96, torch.float32)
    w = dequantize_into(torch.empty(24 * 96), p.qweight, p.scales, p.offsets, 96)
    assert torch.equal(w, dequantize_packed(p, torch.float32).t())


def test_a_group_that_is_not_whole_words_is_refused():
    p = packed_layer(16, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="group size 12"):
        dequantize_into(torch.empty(16 * 64), p.qweight, p.scales, p.offsets, 12)


def test_the_linear_is_x_times_the_dequantized_weights_with_bias_and_leading_dims():
    p = packed_layer(40, 128, 32, torch.float32)
    x = torch.randn(2, 9, 128, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    y = dequant_linear(x, p.qweight, p.scales, p.offsets, 32, torch.empty(8000), bias)
    expected = F.linear(x, dequantize_packed(p, torch.float32), bias)
    assert y.shape == (2, 9, 40)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the w4a16 plugin's layers


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory):
    from fixtures import build_tiny_model
    from fixtures.quantized import quantize_checkpoint

    root = tmp_path_factory.mktemp("dequant")
    src = build_tiny_model(root / "m", "llama", hidden_size=128, intermediate_size=256)
    return quantize_checkpoint(src, root / "gptq", "gptq", sym=False)


def w4a16_model(q_dir, dequant_min_rows: int | None):
    """A CPU model runner over the GPTQ checkpoint with the `w4a16` plugin's options."""
    from pegboard.core.model_runner import ModelRunner
    from pegboard.core.models.quantization import LinearChoice, detect_quantization
    from pegboard.plugins.linear.w4a16 import W4A16Linear, W4A16Options

    plugin = W4A16Linear(W4A16Options(kernel="triton", dequant_min_rows=dequant_min_rows))
    linear = LinearChoice("w4a16", plugin.linear_kernel, detect_quantization(q_dir, None))
    return ModelRunner(q_dir, "float32", "cpu", progress=False, linear=linear)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover the device")
def test_layers_take_the_dequant_path_from_the_option_rows_and_share_one_buffer(
    quantized_dirs, monkeypatch
):
    from pegboard.core.kernels import w4a16_dequant
    from pegboard.plugins.linear.w4a16 import Int4Linear

    calls = []  # (the layers take the module's function each time their kernels are switched on)
    monkeypatch.setattr(
        w4a16_dequant, "dequant_linear", lambda *a: calls.append(a) or dequant_linear(*a)
    )
    runner = w4a16_model(quantized_dirs[0], dequant_min_rows=6)
    runner.model.set_fused_kernels(True)  # the Triton kernels, interpreted on CPU
    layers = [m for m in runner.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.dequant_linear is not None for m in layers)
    buffers = {id(m.dequant_buffer) for m in layers}
    assert len(buffers) == 1  # one per model
    largest = max(m.spec.in_features * m.spec.out_features for m in layers)
    assert layers[0].dequant_buffer.tensor.numel() == largest
    assert layers[0].describe().endswith("de-quantize + cuBLAS from 6 rows")

    layer = layers[0]
    for rows, through_buffer in ((5, False), (6, True), (30, True)):
        x = torch.randn(rows, layer.spec.in_features)
        calls.clear()
        got = layer(x)
        assert bool(calls) == through_buffer, rows
        runner.model.set_fused_kernels(False)  # the oracle: de-quantize + F.linear per call
        expected = layer(x)
        runner.model.set_fused_kernels(True)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_zero_rows_turns_the_path_off_and_negative_is_refused(quantized_dirs):
    import pydantic
    from pegboard.plugins.linear.w4a16 import Int4Linear, W4A16Options

    runner = w4a16_model(quantized_dirs[0], dequant_min_rows=0)
    runner.model.set_fused_kernels(True)
    layers = [m for m in runner.model.modules() if isinstance(m, Int4Linear)]
    assert all(m.dequant_linear is None and m.dequant_buffer is None for m in layers)
    with pytest.raises(pydantic.ValidationError):
        W4A16Options(dequant_min_rows=-1)


def test_unset_the_rows_follow_the_layers_size_as_measured():
    from pegboard.plugins.linear.w4a16 import W4A16Options, auto_dequant_min_rows

    assert W4A16Options().dequant_min_rows is None
    assert auto_dequant_min_rows(4096 * 1024) == 64  # Qwen3-0.6B's qkv
    assert auto_dequant_min_rows(4096 * 4096) == 64  # Llama-3.1-8B's o
    assert auto_dequant_min_rows(6144 * 4096) == 128  # its qkv
    assert auto_dequant_min_rows(28672 * 4096) == 128  # its gate_up


def test_the_cli_flag_reaches_the_plugins_options():
    import argparse

    from pegboard.core.options import add_plugin_arguments, collect_plugin_options
    from pegboard.core.plugin_manager import PluginManager

    parser = argparse.ArgumentParser()
    add_plugin_arguments(parser, PluginManager())
    args = parser.parse_args(["--w4a16-dequant-min-rows", "128"])
    assert collect_plugin_options(args, PluginManager())["w4a16"] == {"dequant_min_rows": 128}


# ------------------------------------------------------------------------------------ GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize(
    ("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)], ids=str
)
def test_bf16_dequant_matches_the_reference_on_llama_shapes(n, k, group):
    group = k if group == -1 else group
    p = packed_layer(n, k, group, torch.bfloat16)
    buffer = torch.empty(n * k, device=DEVICE, dtype=torch.bfloat16)
    w = dequantize_into(buffer, p.qweight, p.scales, p.offsets, group)
    assert torch.equal(w, dequantize_packed(p, torch.bfloat16).t())
    x = torch.randn(100, k, device=DEVICE, dtype=torch.bfloat16)
    y = dequant_linear(x, p.qweight, p.scales, p.offsets, group, buffer)
    ref = x.double() @ dequantize_packed(p, torch.bfloat16).double().t()
    assert rel_error(y, ref) < 1e-2


@gpu
@needs_cuda
def test_two_layers_share_the_buffer_inside_one_cuda_graph():
    a, b = (
        packed_layer(512, 256, 64, torch.bfloat16, 1),
        packed_layer(256, 512, 64, torch.bfloat16, 2),
    )
    buffer = torch.empty(512 * 256, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(80, 256, device=DEVICE, dtype=torch.bfloat16)

    def two_layers():
        h = dequant_linear(x, a.qweight, a.scales, a.offsets, 64, buffer)
        return dequant_linear(h, b.qweight, b.scales, b.offsets, 64, buffer)

    eager = two_layers()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        two_layers()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = two_layers()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, two_layers())
    assert not torch.equal(out, eager)  # the replay read the new x
