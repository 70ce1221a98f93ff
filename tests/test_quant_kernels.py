"""W4A16 Triton kernels (`pegboard.core.kernels.w4a16`) against the de-quantized reference
`x @ dequantize(W).T`, and the w4a16 layers running them.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on small shapes in float32. The `gpu` tests run bf16 at group sizes
32/64/128 and per-channel on Llama-3.1-8B's shapes, at 1 to 64 rows, split-K included, a CUDA
graph capture, and a whole quantized model's logits against its de-quantized run.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.int4_layers import rel_error
from pegboard.core.kernels.w4a16 import (  # noqa: E402
    W4A16Config,
    pick_config,
    unsupported_reason,
    w4a16_linear,
)
from pegboard.plugins.linear.int4 import Int4Weights, dequantize_packed, pack  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_layer(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.01 + 0.001
    offsets = -torch.randint(0, 16, (n, k // group), generator=gen).float() * scales
    p = pack(Int4Weights(q, scales, offsets, group), dtype)
    for name in ("qweight", "scales", "offsets"):
        setattr(p, name, getattr(p, name).to(DEVICE))
    return p


def reference(x: torch.Tensor, p, bias=None) -> torch.Tensor:
    """float64 `x @ W.T + bias` of the weights rounded to x's dtype, as the kernels use them."""
    w = dequantize_packed(p, torch.float32).to(x.dtype).double()
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize(
    ("rows", "config"),
    [
        (1, W4A16Config(1, 16, 32)),  # CUDA cores, one row
        (3, W4A16Config(4, 16, 64, split_k=2)),  # CUDA cores, split K
        (2, W4A16Config(2, 32, 128)),  # CUDA cores, a step spanning several groups
        (16, W4A16Config(16, 16, 32)),  # tensor cores
        (20, W4A16Config(16, 32, 32, split_k=2)),  # tensor cores, split K, ragged M
        (5, W4A16Config(16, 16, 128)),  # tensor cores, a step spanning several groups
        (1, W4A16Config(16, 32, 64, split_k=2)),  # tensor cores for one row, split K
        (20, W4A16Config(16, 16, 32, split_k=4, fixup=True)),  # split K summed in the kernel
        (3, W4A16Config(4, 16, 32, split_k=2, fixup=True)),  # the same, CUDA cores
    ],
    ids=str,
)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernels_match_the_dequantized_reference_in_the_interpreter(rows, config, group):
    p = packed_layer(40, 128, group, torch.float32)  # N = 40: a ragged last block of outputs
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.randn(40).to(DEVICE)
    got = w4a16_linear(x, p.qweight, p.scales, p.offsets, group, bias, config)
    torch.testing.assert_close(got.double(), reference(x, p, bias), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover the device")
@pytest.mark.parametrize("group", [64, 128])
def test_tensor_core_kernel_in_fp16_scales_after_the_dot_in_the_interpreter(group):
    # 16-bit x with a step inside one group: nibbles as 1024 + q by bit pattern, the scale and
    # offset applied to the dot's sums (bf16 uses 128 + q: same code, the interpreter's bf16
    # tl.dot is broken). Not rounded to fp16 weights: compared with the exact product.
    p = packed_layer(40, 256, group, torch.float16)
    x = (torch.randn(5, 256, generator=torch.Generator().manual_seed(2)) * 4).half()
    got = w4a16_linear(x, p.qweight, p.scales, p.offsets, group, None, W4A16Config(16, 16, 64))
    w = dequantize_packed(p, torch.float32).double()
    expected = x.double() @ w.t()
    assert ((got.double() - expected).norm() / expected.norm()).item() < 2e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover bf16 on the device")
def test_cuda_core_kernel_in_bf16_is_within_bf16_rounding_in_the_interpreter():
    # (The interpreter's bf16 tl.dot is broken in triton 3.x, so only the CUDA-core kernel.)
    p = packed_layer(64, 256, 64, torch.bfloat16)
    x = torch.randn(2, 256).to(torch.bfloat16)
    got = w4a16_linear(x, p.qweight, p.scales, p.offsets, 64, None, W4A16Config(2, 32, 128))
    expected = reference(x, p)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_split_k_fixup_leaves_its_counters_at_zero_for_the_next_launch():
    from pegboard.core.kernels import w4a16

    p = packed_layer(40, 128, 32, torch.float32)
    x = torch.randn(17, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cfg = W4A16Config(16, 16, 32, split_k=4, fixup=True)
    first = w4a16_linear(x, p.qweight, p.scales, p.offsets, 32, None, cfg)
    counters = w4a16._fixup_counters(x.device, 6)
    assert counters is not None and int(counters.abs().sum()) == 0  # 2 x 3 tiles, all reset
    again = w4a16_linear(x, p.qweight, p.scales, p.offsets, 32, None, cfg)  # counts from 0 again
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(first.double(), reference(x, p), atol=1e-4, rtol=1e-4)


def test_kernels_take_strided_rows_and_keep_leading_dimensions():
    p = packed_layer(16, 64, 32, torch.float32)
    x = torch.randn(2, 3, 96).to(DEVICE)[..., :64]  # rows not contiguous
    got = w4a16_linear(x, p.qweight, p.scales, p.offsets, 32, None, W4A16Config(4, 16, 32))
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got.double(), reference(x.reshape(6, 64), p).view(2, 3, 16),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_shapes_the_kernels_cannot_take_are_named():
    assert unsupported_reason(4096, 4096, 128) is None
    assert "K=576" not in (unsupported_reason(576, 576, 32) or "")  # SmolLM2 with g32: fine
    assert "K=100" in unsupported_reason(64, 100, 4)


def test_default_configs_split_k_only_where_it_divides():
    for m in (1, 4, 16, 32, 64, 300):
        for n, k in ((6144, 4096), (4096, 14336), (576, 576), (1536, 576)):
            for group in (32, 64, 128, k):
                cfg = pick_config(m, n, k, group)
                assert k % (cfg.block_k * cfg.split_k) == 0
                assert group % cfg.block_k == 0  # a step inside one group: scale after the dot
                assert cfg.dot and cfg.block_m >= 16  # tensor cores at every row count


def test_measured_table_entries_are_used_for_their_device_and_shape(monkeypatch):
    from pegboard.core.kernels import w4a16

    entry = {"block_m": 1, "block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 8}
    table = {"Fake GPU": {w4a16.table_key(6144, 4096, 128): {"1": entry}}}
    monkeypatch.setattr(w4a16, "_table", lambda: table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    cuda = torch.device("cuda")
    assert pick_config(1, 6144, 4096, 128, cuda) == W4A16Config(1, 64, 256, 4, 8)
    assert pick_config(1, 6144, 4096, 64, cuda) == pick_config(1, 6144, 4096, 64)  # no entry
    assert pick_config(2, 6144, 4096, 128, cuda) == pick_config(2, 6144, 4096, 128)


# ---------------------------------------------------------------------------------- GPU

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16, 32, 64])
def test_bf16_kernels_match_the_dequantized_reference_on_llama_shapes(group, shape, rows):
    n, k = shape
    g = k if group == -1 else group
    p = packed_layer(n, k, g, torch.bfloat16)
    x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
    got = w4a16_linear(x, p.qweight, p.scales, p.offsets, g)
    expected = reference(x, p)
    rel = (got.double() - expected).norm() / expected.norm()
    assert rel < 1e-2, f"relative error {rel:.2e}"


@gpu
@needs_cuda
def test_bf16_kernels_replay_in_a_cuda_graph():
    p = packed_layer(4096, 4096, 128, torch.bfloat16)
    x = torch.randn(4, 4096, device=DEVICE).to(torch.bfloat16)
    out = w4a16_linear(x, p.qweight, p.scales, p.offsets, 128)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear(x, p.qweight, p.scales, p.offsets, 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out.double(), reference(x, p), atol=0.05, rtol=0.02)


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_inline_asm_unpacking_gives_the_bits_of_the_plain_spelling(group, dtype):
    # The interpreter runs only the plain Triton spelling of the and-or (`asm=False`); the
    # compiled `lop3` must give the same 16-bit patterns, hence the same sums, bit for bit.
    p = packed_layer(4096, 4096, group, dtype)
    x = torch.randn(5, 4096, device=DEVICE).to(dtype)
    cfg = W4A16Config(16, 128, group, split_k=4)
    asm = w4a16_linear(x, p.qweight, p.scales, p.offsets, group, None, cfg)
    plain = w4a16_linear(x, p.qweight, p.scales, p.offsets, group, None, replace(cfg, asm=False))
    assert torch.equal(asm, plain)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", LLAMA_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_split_k_fixup_matches_the_reference_and_replays_in_a_cuda_graph(shape, rows):
    # Each tile's last program sums the partials (a counter per tile it resets): memory
    # ordering between SMs is what the interpreter cannot check. Replayed twice: the counters
    # must be back at zero after each launch.
    n, k = shape
    p = packed_layer(n, k, 128, torch.bfloat16)
    cfg = W4A16Config(max(16, rows), 128, 128, split_k=8, fixup=True)
    x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
    out = w4a16_linear(x, p.qweight, p.scales, p.offsets, 128, None, cfg)  # compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear(x, p.qweight, p.scales, p.offsets, 128, None, cfg)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        expected = reference(x, p)
        rel = (out.double() - expected).norm() / expected.norm()
        assert rel < 1e-2, f"relative error {rel:.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "gguf"])
def test_quantized_model_on_the_gpu_matches_its_dequantized_run(method, tmp_path):
    from fixtures import build_tiny_model
    from fixtures.quantized import quantize_checkpoint

    if method == "gguf":
        pytest.importorskip("gguf")  # carry its wheel to the GPU machine (pure Python)
    src = build_tiny_model(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    q_dir, deq_dir = quantize_checkpoint(src, tmp_path / method, method, sym=False)
    # pegboard's Triton kernels (gemlite's: test_w4a16_gemlite.py)
    runner, err, baseline = w4a16_errors(q_dir, deq_dir, method, "triton")
    layer = runner.model.model.layers[0].mlp.gate_up_proj
    assert layer.kernel is not None and layer.gemlite is None
    assert err < 1.5 * baseline + 2e-3, f"error {err:.2e} vs bf16's own {baseline:.2e}"


def gpu_logits(model_dir, dtype="bfloat16", **kwargs):
    """The model runner and its float64 logits at every position of a 30-token prompt, on CUDA
    (one prefill step, the torch attention backend)."""
    from pegboard.core.model_runner import ModelRunner
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.sdk.types import KVPool, Request

    prompt = list(range(10, 40))
    runner = ModelRunner(model_dir, dtype, "cuda", progress=False, **kwargs)
    pool = KVPool.allocate(runner.info, 4, 16)
    runner.set_attention(TorchAttentionBackend(runner.info, pool))
    r = Request(prompt_token_ids=prompt)
    r.page_table = [0, 1]
    batch = runner.prepare([r], [len(prompt)], 16)
    batch.logits_indices = torch.arange(len(prompt), device=DEVICE)
    return runner, runner.forward(batch).double()


def w4a16_errors(q_dir, deq_dir, method: str, kernel: str):
    """A quantized checkpoint's logits through the `w4a16` plugin with `kernel`, against the
    float32 oracle of its de-quantized twin: `(runner, error, bf16's own error)`. The yardstick
    is bf16 itself: a random tiny model's bf16 logits are ~3-4e-2 from float32 (chaotic wide
    weights), so two bf16 runs differing only in summation order are as far apart. The 4-bit run
    must be about as far from the oracle as the de-quantized bf16 run: an independent
    perturbation of bf16's own size would give sqrt(2) = 1.41x, so the callers' bound is 1.5x.
    (Scales/offsets rounded to bf16 gave 1.8x: 6.2e-2 on the GPU.)"""
    from pegboard.core.models.quantization import LinearChoice, detect_quantization
    from pegboard.plugins.linear.w4a16 import W4A16Linear, W4A16Options

    quant = detect_quantization(q_dir, "gguf" if method == "gguf" else None)
    plugin = W4A16Linear(W4A16Options(kernel=kernel))
    runner, got = gpu_logits(q_dir, linear=LinearChoice("w4a16", plugin.linear_kernel, quant))
    _, oracle = gpu_logits(deq_dir, "float32")
    _, bf16 = gpu_logits(deq_dir)
    return runner, rel_error(got, oracle), rel_error(bf16, oracle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test above covers the device")
def test_w4a16_layers_run_the_kernels_in_a_model_in_the_interpreter(tmp_path):
    from fixtures import build_tiny_model
    from fixtures.quantized import quantize_checkpoint
    from test_quant_formats import PROMPT, _linear_choice, forward_logits

    src = build_tiny_model(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    q_dir, deq_dir = quantize_checkpoint(src, tmp_path / "gptq", "gptq", sym=False)
    runner = forward_logits(q_dir, linear=_linear_choice("gptq", q_dir))[1]
    runner.model.set_fused_kernels(True)  # the Triton kernels, interpreted on CPU
    layer = runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.kernel is not None and "Triton W4A16" in layer.describe()
    x = torch.randn(len(PROMPT), 128)
    runner.model.set_fused_kernels(False)
    expected = layer(x)
    runner.model.set_fused_kernels(True)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
