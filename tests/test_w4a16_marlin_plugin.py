"""The w4a16 plugin's Marlin path (`--w4a16-kernel marlin`, `core/kernels/w4a16_marlin.py`).

On CPU, with the kernel's CUDA-only checks lifted and its launch stood in by the pure-torch
model of the kernel (`fixtures/marlin_emulation.py`, which reads the layout the plugin made as
the kernel does): calls of at most `PLUGIN_MAX_ROWS` rows go to the Marlin kernel with the
configuration measured for the layer's shape and rows, larger ones to pegboard's Triton
kernels; the bias is added; x is permuted first under activation order; a layer the kernel
cannot take keeps the Triton kernels and says why; split-K layers get their partial sums at
load; `auto` runs marlin, tinygemm where marlin cannot (`AUTO_PREFERS_MARLIN`); the option's choices and errors. Marked
`gpu` (skipped without CUDA): a Llama-sized layer through the plugin in a CUDA graph, a
quantized model's logits, and an engine's greedy tokens against `--w4a16-kernel triton`.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import build_tiny_model
from fixtures.int4_layers import rel_error
from fixtures.marlin_emulation import emulate
from fixtures.quantized import quantize_checkpoint
from pegboard.core.kernels import w4a16, w4a16_marlin, w4a16_tinygemm
from pegboard.core.kernels.w4a16_marlin import MarlinConfig
from pegboard.plugins.linear import w4a16 as plugin
from pegboard.plugins.linear.int4 import PackedInt4, dequantize_packed
from pegboard.plugins.linear.w4a16 import Int4Linear, W4A16Linear, W4A16Options
from pegboard.sdk.linear import LinearSpec, QuantizationConfig, QuantizationError

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = torch.bfloat16


def _reference(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    p = PackedInt4(layer.qweight, layer.scales, layer.offsets, layer.group_size, None)
    return x.double() @ dequantize_packed(p, torch.float32).double().t()


def _dequantized_product(x, qweight, scales, offsets, group_size, bias=None):
    p = PackedInt4(qweight, scales, offsets, group_size, None)
    return torch.nn.functional.linear(x, dequantize_packed(p, x.dtype), bias)


def _marlin_on_cpu(monkeypatch) -> tuple[list[tuple[int, MarlinConfig]], list[int]]:
    """The Marlin kernel's CUDA-only checks lifted, its compilation skipped and its launch
    stood in by the emulation (an H200's 132 multiprocessors for the split of K); pegboard's
    Triton kernel stood in by the de-quantized product. Returns `(rows, config)` of every
    Marlin call and the rows of every Triton call."""
    marlin_calls, triton_calls = [], []

    def emulated(x, layout, config, partials=None):
        rows = x.numel() // x.shape[-1]
        marlin_calls.append((rows, config))
        return emulate(x.reshape(rows, -1), layout, config).reshape(*x.shape[:-1], layout.n)

    def triton(x, *args, **kwargs):
        triton_calls.append(x.numel() // x.shape[-1])
        return _dequantized_product(x, *args, **kwargs)

    monkeypatch.setattr(w4a16_marlin, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(w4a16_marlin, "compiled", lambda config, mt, group: None)
    monkeypatch.setattr(w4a16_marlin, "_multiprocessors", lambda index: 132)
    monkeypatch.setattr(w4a16_marlin, "marlin_linear", emulated)
    monkeypatch.setattr(w4a16, "w4a16_linear", triton)
    return marlin_calls, triton_calls


def _info(device=torch.device("cpu"), dtype=BF16):
    from pegboard.sdk.types import ModelInfo

    return ModelInfo(architecture="llama", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                     hidden_size=32, vocab_size=64, max_model_len=64, dtype=dtype,
                     device=device)  # fmt: skip


def _layer(kernel="marlin", n=64, k=256, group=64, bias=False, device="cpu") -> Int4Linear:
    method = W4A16Linear(W4A16Options(kernel=kernel)).linear_kernel(
        _info(), QuantizationConfig("gptq", group_size=group)
    )
    dev = torch.device(device)
    spec = LinearSpec("model.layers.0.mlp.down_proj", k, n, bias=bias, dtype=BF16, device=dev)
    layer = method.create(spec)
    layer.fill_random(torch.Generator(device=device).manual_seed(0))
    return layer


# -------------------------------------------------------------------------------- CPU


def test_kernel_option_takes_marlin():
    assert W4A16Linear(W4A16Options(kernel="marlin")).options.kernel == "marlin"
    assert "marlin" in W4A16Options.model_fields["kernel"].description


def test_calls_of_up_to_32_rows_go_to_marlin_and_larger_ones_to_pegboards_kernels(monkeypatch):
    marlin_calls, triton_calls = _marlin_on_cpu(monkeypatch)
    layer = _layer(bias=True)
    layer.bias = torch.randn(64).to(BF16)
    layer.set_fused_kernels(True)
    assert layer.marlin is not None and layer.kernel is not None and layer.tinygemm is None
    assert layer.describe() == (
        "w4a16 g64, Marlin kernel up to 32 rows (4-bit weights held twice), "
        "Triton W4A16 kernels above, de-quantize + cuBLAS from 64 rows"
    )
    shapes = [(1, 256), (3, 256), (2, 4, 256), (9, 256), (16, 256), (17, 256), (32, 256)]
    for shape in [*shapes, (33, 256), (40, 256)]:
        x = torch.randn(shape).to(BF16)
        out = layer(x)
        assert out.shape == (*shape[:-1], 64) and out.dtype == BF16
        ref = _reference(x.reshape(-1, 256), layer) + layer.bias.double()
        assert rel_error(out.reshape(-1, 64), ref) < 1e-2
    assert [rows for rows, _ in marlin_calls] == [1, 3, 8, 9, 16, 17, 32]
    assert triton_calls == [33, 40]


def test_each_layer_runs_the_configuration_measured_for_its_shape_and_rows():
    config = w4a16_marlin.layer_config
    # Llama-3.1-8B g128: tiles 1 (M <= 8, session 13's sweep, PDL), tiles 2 (M 9-16, session 12's),
    # tiles 4 (M 17-32, session 14's)
    assert config(1, 6144, 4096, 128) == MarlinConfig(8, 2, stages=4, x_ahead=True, pdl=True)
    assert config(2, 6144, 4096, 128) == MarlinConfig(4, 4)
    assert config(1, 28672, 4096, 128) == MarlinConfig(4, 2, pdl=True)
    assert config(2, 4096, 14336, 128) == MarlinConfig(8, 2)
    assert config(4, 4096, 4096, 128) == MarlinConfig(8, 2, l2_ahead=1)
    # other shapes: the least summed time; a group the measured step cannot take: a candidate
    assert config(1, 1024, 3072, 128) == MarlinConfig(8, 4)
    assert config(2, 1024, 3072, 128) == MarlinConfig(8, 2)
    assert config(4, 1024, 3072, 128) == MarlinConfig(4, 2)
    assert config(1, 6144, 4096, 32) == MarlinConfig(8, 1)  # steps of 64 columns for group 32
    with pytest.raises(ValueError, match="no Marlin configuration"):
        config(1, 64, 96 * 64 + 32, 32)


def test_configurations_are_picked_per_rows_at_load(monkeypatch):
    marlin_calls, _ = _marlin_on_cpu(monkeypatch)
    configs = {1: MarlinConfig(4, 2), 2: MarlinConfig(2, 1), 4: MarlinConfig(8, 1)}
    monkeypatch.setitem(w4a16_marlin.LAYER_CONFIGS, (64, 512), configs)
    layer = _layer(k=512)
    layer.set_fused_kernels(True)
    assert len(layer.marlin_configs) == 33
    for rows in (1, 8, 9, 16, 17, 32):
        layer(torch.randn(rows, 512).to(BF16))
    assert [c for _, c in marlin_calls] == [configs[t] for t in (1, 1, 2, 2, 4, 4)]


def test_a_layer_no_configuration_takes_at_32_rows_stops_at_16(monkeypatch):
    marlin_calls, triton_calls = _marlin_on_cpu(monkeypatch)
    real = w4a16_marlin.layer_config

    def no_tiles_4(tiles, n, k, group):
        if tiles == 4:
            raise ValueError("no Marlin configuration takes M=32 (test)")
        return real(tiles, n, k, group)

    monkeypatch.setattr(w4a16_marlin, "layer_config", no_tiles_4)
    layer = _layer()
    layer.set_fused_kernels(True)
    assert layer.marlin is not None and len(layer.marlin_configs) == 17
    assert "Marlin kernel up to 16 rows" in layer.describe()
    for rows in (16, 17):
        layer(torch.randn(rows, 256).to(BF16))
    assert [r for r, _ in marlin_calls] == [16] and triton_calls == [17]


def test_a_layer_whose_k_is_split_across_blocks_keeps_its_partial_sums(monkeypatch):
    _marlin_on_cpu(monkeypatch)
    layer = _layer(n=64, k=4096, group=128)  # 4 row blocks on 132 multiprocessors: K is split
    layer.set_fused_kernels(True)
    splits = max(
        w4a16_marlin.splits(c, 64, 4096, torch.device("cpu")) for c in layer.marlin_configs
    )
    assert splits > 1
    assert layer.marlin_partials.dtype == torch.float32
    assert layer.marlin_partials.numel() == splits * 32 * 64
    big = _layer(n=4096, k=256)  # 256 row blocks: one split, nothing kept
    big.set_fused_kernels(True)
    assert big.marlin is not None and big.marlin_partials is None


def test_activation_order_permutes_x_before_marlin(monkeypatch, source_dir, tmp_path):
    from pegboard.core.model_runner import ModelRunner
    from pegboard.core.models.quantization import LinearChoice, detect_quantization

    marlin_calls, _ = _marlin_on_cpu(monkeypatch)
    q_dir, _ = quantize_checkpoint(source_dir, tmp_path / "gptq", "gptq", sym=False, desc_act=True)
    hook = W4A16Linear(W4A16Options(kernel="marlin")).linear_kernel
    choice = LinearChoice("w4a16", hook, detect_quantization(q_dir, None))
    runner = ModelRunner(q_dir, "bfloat16", "cpu", progress=False, linear=choice)
    layer = runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.perm is not None
    x = torch.randn(3, 128).to(BF16)
    expected = layer(x).double()  # the portable path: de-quantize + matmul
    runner.model.set_fused_kernels(True)
    assert layer.marlin is not None
    assert rel_error(layer(x), expected) < 1e-2 and [r for r, _ in marlin_calls] == [3]
    runner.model.set_fused_kernels(False)
    assert layer.marlin is None and layer.marlin_configs == ()


def test_a_layer_marlin_cannot_take_keeps_pegboards_kernels_and_says_why(monkeypatch):
    marlin_calls, triton_calls = _marlin_on_cpu(monkeypatch)
    layer = _layer(n=40)  # N = 40: not whole tiles of 16 output rows
    layer.set_fused_kernels(True)
    assert layer.marlin is None and layer.kernel is not None
    assert layer.describe() == (
        "w4a16 g64, Triton W4A16 kernels, de-quantize + cuBLAS from 64 rows "
        "(not marlin: N=40 is not a multiple of 16)"
    )
    layer(torch.randn(1, 256).to(BF16))
    assert marlin_calls == [] and triton_calls == [1]


def test_a_configuration_nvrtc_rejects_leaves_the_layer_on_pegboards_kernels(monkeypatch):
    _marlin_on_cpu(monkeypatch)

    def rejected(config, mt, group):
        raise w4a16_marlin.CompileError("w4a16_marlin_m1: error: too many resources")

    monkeypatch.setattr(w4a16_marlin, "compiled", rejected)
    layer = _layer()
    layer.set_fused_kernels(True)
    assert layer.marlin is None and layer.kernel is not None
    assert "(not marlin: w4a16_marlin_m1: error: too many resources)" in layer.describe()


def test_marlin_is_not_used_off_cuda_or_without_bf16_and_says_why():
    assert "CUDA" in w4a16_marlin.unavailable_reason(torch.device("cpu"), BF16)
    assert "bf16" in w4a16_marlin.unavailable_reason(torch.device("cuda"), torch.float16)
    layer = _layer("marlin")  # on CPU: the portable path, the reason in the load line
    layer.set_fused_kernels(True)
    assert layer.marlin is None
    assert "(not marlin: the Marlin kernel runs on CUDA devices only)" in layer.describe()


def test_auto_runs_marlin_and_tinygemm_where_marlin_cannot_take_a_layer(monkeypatch):
    _marlin_on_cpu(monkeypatch)
    monkeypatch.setattr(w4a16_tinygemm, "unavailable_reason", lambda device, dtype: None)
    layer = _layer("auto")
    layer.set_fused_kernels(True)
    assert layer.marlin is not None and layer.tinygemm is None
    short = _layer("auto", k=96, group=32)  # marlin cannot take it: tinygemm can
    short.set_fused_kernels(True)
    assert short.marlin is None and short.tinygemm is not None
    assert "not marlin: K=96 is not a multiple of 64" in short.describe()
    monkeypatch.setattr(plugin, "AUTO_PREFERS_MARLIN", False)  # the switch back to tinygemm
    layer.set_fused_kernels(True)
    assert layer.tinygemm is not None and layer.marlin is None


def test_marlin_named_for_a_cuda_model_it_cannot_serve_fails_at_load(monkeypatch):
    info = _info(device=torch.device("cuda"), dtype=torch.float16)
    quant = QuantizationConfig("gptq", group_size=128)
    named = W4A16Linear(W4A16Options(kernel="marlin"))
    with pytest.raises(QuantizationError, match="--w4a16-kernel marlin: .*bf16"):
        named.linear_kernel(info, quant)

    def no_headers(config, mt, group):
        raise w4a16_marlin.CompileError("w4a16_marlin_m1: could not find CUDA_HOME")

    monkeypatch.setattr(w4a16_marlin, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(w4a16_marlin, "compiled", no_headers)
    with pytest.raises(QuantizationError, match="--w4a16-kernel marlin: .*CUDA_HOME"):
        named.linear_kernel(_info(device=torch.device("cuda")), quant)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("marlin") / "llama", "llama", hidden_size=128,
        intermediate_size=256,
    )  # fmt: skip


# -------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(6144, 4096), (1024, 4096)], ids=str)  # 1024: K split
def test_a_llama_layer_through_the_plugin_replays_in_a_cuda_graph(shape):
    n, k = shape
    layer = _layer(n=n, k=k, group=128, bias=True, device="cuda")
    layer.bias = torch.randn(n, device="cuda").to(BF16)
    layer.set_fused_kernels(True)
    assert layer.marlin is not None, layer.describe()
    assert (layer.marlin_partials is not None) == (n == 1024)  # 64 row blocks on 132 SMs
    for rows in (1, 16):
        x = torch.randn(rows, k, device="cuda").to(BF16)
        layer(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            ref = _reference(x, layer) + layer.bias.double()
            assert rel_error(out, ref) < 4e-3


def test_a_configuration_nvrtc_rejects_is_compiled_once_per_process(monkeypatch):
    calls = []

    def no_headers(source, name):
        calls.append(name)
        raise OSError("could not find CUDA_HOME")

    monkeypatch.setattr(torch.cuda, "_compile_kernel", no_headers, raising=False)
    w4a16_marlin._compiled.cache_clear()
    config = w4a16_marlin.MarlinConfig()
    for _ in range(3):  # `auto` asks for every layer of a model
        with pytest.raises(w4a16_marlin.CompileError, match="CUDA_HOME"):
            w4a16_marlin.compiled(config, 1, 128)
    assert len(calls) == 1
    w4a16_marlin._compiled.cache_clear()
