"""The residual add and RMSNorm inside the next GEMV (`gemv_norm`, `dense.norm_linear`,
`PEGBOARD_FUSED_NORM_GEMV`): the GEMV of the normalised sum and the sum itself from one launch,
equal to the separate norm and GEMV up to float rounding, and the decoder with the switch on
giving the logits of the switch off without the norm kernels it fused.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes (float32: the
interpreter's bf16 casts truncate); the `gpu` tests run Llama-3.1-8B's qkv and gate/up shapes in
bf16 and a graph-captured decode.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import dense, fused_norm_gemv  # noqa: E402
from pegboard.core.kernels import gemv as gemv_module  # noqa: E402
from pegboard.core.kernels import norm as norm_module  # noqa: E402
from pegboard.core.kernels.gemv import GemvConfig  # noqa: E402
from pegboard.core.kernels.gemv_norm import norm_gemv  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models.layers import Linear  # noqa: E402
from test_fused_kernels import prefill_logits  # noqa: E402
from test_gemv import DEVICE, DOT, ELEMENTWISE, SPLIT, randn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

EPS = 1e-6


def reference(x, residual, norm_weight, weight, bias=None):
    """The unfused float32 computation: `x + residual`, RMSNorm (HF's), then the linear."""
    h = x.float() + residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.float()
    return F.linear(normed, weight.float(), None if bias is None else bias.float()), h


def inputs(rows: int, n: int, k: int, dtype=torch.float32):
    x, r = randn(rows, k, seed=rows), randn(rows, k, seed=rows + 10)
    return (
        x.to(dtype),
        r.to(dtype),
        randn(k, seed=3).add(1.0).to(dtype),  # norm weights around 1
        randn(n, k, seed=7).mul(0.2).to(dtype),
    )


@pytest.mark.parametrize(
    "config",
    [ELEMENTWISE, GemvConfig(2, 64), GemvConfig(8, 128, num_warps=2)],
    ids=["bn4", "bn2", "bn8"],
)
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_gemv_equals_the_norm_then_the_gemv(config, rows, bias):
    # N = 37 leaves the last program's rows partly past N; K = 200 is no whole number of blocks
    x, r, nw, w = inputs(rows, 37, 200)
    b = randn(37, seed=2) if bias else None
    out, new_residual = norm_gemv(x, r, nw, EPS, w, b, config)
    expected, h = reference(x, r, nw, w, b)
    assert out.shape == (rows, 37) and new_residual.shape == (rows, 200)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_residual, h, atol=0, rtol=0)  # the add, as `x + residual`


def test_norm_gemv_matches_the_fused_norm_kernel_and_the_gemv():
    """Against what the decoder runs unfused (`norm.rms_norm` with the residual, then the GEMV
    of the same configuration), in float32."""
    x, r, nw, w = inputs(2, 24, 128)
    normed, summed = norm_module.rms_norm(x, nw, EPS, r)
    out, new_residual = norm_gemv(x, r, nw, EPS, w, None, ELEMENTWISE)
    torch.testing.assert_close(out, gemv_module.gemv(normed, w, None, ELEMENTWISE), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)


@pytest.mark.parametrize("config", [DOT, SPLIT], ids=["dot", "split"])
def test_norm_gemv_refuses_configs_it_does_not_run(config):
    x, r, nw, w = inputs(1, 16, 64)
    with pytest.raises(ValueError, match="element-wise, unsplit config"):
        norm_gemv(x, r, nw, EPS, w, None, config)


def test_dense_norm_linear_only_where_the_gemv_takes_the_rows(decode_configs):
    x, r, nw, w = inputs(3, 32, 64)
    assert dense.norm_linear(x, r, nw, EPS, w) is None  # no configuration for the shape
    decode_configs[(torch.float32, 32, 64)] = {1: ELEMENTWISE, 2: ELEMENTWISE, 4: DOT, 8: SPLIT}
    out, new_residual = dense.norm_linear(x[:2], r[:2], nw, EPS, w)
    expected, h = reference(x[:2], r[:2], nw, w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_residual, h, atol=0, rtol=0)
    assert dense.norm_linear(x, r, nw, EPS, w) is None  # 3 rows: the tensor-core config
    assert dense.norm_linear(x.repeat(3, 1), r.repeat(3, 1), nw, EPS, w) is None  # 9 rows


def test_dense_norm_linear_widens_the_block(decode_configs, monkeypatch):
    """`min_block_n` gives each program at least that many output rows (the norm's work per
    program is then shared by more of them); the result stays the same."""
    x, r, nw, w = inputs(1, 32, 64)
    decode_configs[(torch.float32, 32, 64)] = {1: GemvConfig(2, 64)}
    from pegboard.core.kernels import gemv_norm

    seen, real = [], gemv_norm.norm_gemv

    def spy(*args):
        seen.append(args[-1].block_n)
        return real(*args)

    monkeypatch.setattr(gemv_norm, "norm_gemv", spy)
    narrow = dense.norm_linear(x, r, nw, EPS, w)
    wide = dense.norm_linear(x, r, nw, EPS, w, min_block_n=8)
    assert seen == [2, 8]
    torch.testing.assert_close(wide[0], narrow[0], rtol=1e-6, atol=1e-6)


def test_switch_values(monkeypatch):
    monkeypatch.delenv("PEGBOARD_FUSED_NORM_GEMV", raising=False)
    assert fused_norm_gemv() == 0  # off by default
    for value, expected in [("0", 0), ("", 0), ("1", 1), ("8", 8)]:
        monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", value)
        assert fused_norm_gemv() == expected
    monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", "yes")
    with pytest.raises(ValueError, match="PEGBOARD_FUSED_NORM_GEMV='yes'"):
        fused_norm_gemv()


@pytest.fixture
def norm_calls(monkeypatch):
    """Rows of each call of the separate norm kernel (set before the fused kernels switch on)."""
    calls: list[int] = []
    real = norm_module.rms_norm

    def spy(x, weight, eps, residual=None):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, eps, residual)

    monkeypatch.setattr(norm_module, "rms_norm", spy)
    return calls


def test_decoder_with_the_norm_in_the_gemv_equals_it_without(
    tiny_llama_dir, decode_configs, norm_calls, monkeypatch
):
    """The tiny Llama (float32) with every projection on the GEMV: with the switch on the same
    logits to float rounding, and only the first layer's input norm and the final norm run
    as separate kernels at up to 8 rows; at 9 rows every norm runs separately again."""
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    model = runner.model
    shapes = {(m.weight.dtype, *m.weight.shape) for m in model.modules() if isinstance(m, Linear)}
    for key in shapes:
        decode_configs[key] = dict.fromkeys([1, 2, 4, 8], GemvConfig(8, 64))
    prompts = [[5, 9, 200, 17], [300, 2, 77]]  # 7 tokens
    layers = model.config.num_layers
    monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", "0")
    model.set_fused_kernels(True)
    expected = prefill_logits(runner, prompts)
    assert len(norm_calls) == 2 * layers + 1
    norm_calls.clear()
    monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", "1")
    model.set_fused_kernels(True)
    torch.testing.assert_close(prefill_logits(runner, prompts), expected, rtol=1e-4, atol=1e-4)
    assert norm_calls == [7, 7]  # the first layer's input norm (no residual yet), the final norm
    norm_calls.clear()
    prompts = [[5, 9, 200, 17, 6], [300, 2, 77, 12]]  # 9 rows: past the GEMV
    assert len(prefill_logits(runner, prompts)) == 2 and norm_calls == [9] * (2 * layers + 1)


def test_a_norm_whose_forward_is_replaced_is_not_fused(tiny_llama_dir, decode_configs, monkeypatch):
    """Tensor parallelism replaces a norm's forward (its all-reduce fused in): that norm must
    run itself, switch or not."""
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    model = runner.model
    for m in model.modules():
        if isinstance(m, Linear):
            decode_configs[(m.weight.dtype, *m.weight.shape)] = {1: GemvConfig(8, 64)}
    monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", "1")
    model.set_fused_kernels(True)
    layer = model.model.layers[1]
    called = []
    original = layer.input_layernorm.forward

    def wrapped(x, residual=None):
        called.append(x.shape[0])
        return original(x, residual)

    layer.input_layernorm.forward = wrapped
    prefill_logits(runner, [[5]])
    assert called == [1]


# ------------------------------------------------------------------ GPU, bf16, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (28672, 4096)], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("min_block_n", [1, 8])
def test_gpu_llama_shapes_in_bf16(n, k, min_block_n):
    """Llama-3.1-8B's qkv and gate/up at one row through their measured configuration: within
    bf16 rounding of the float32 reference, as close as the unfused bf16 path, and the new
    residual bit for bit `x + residual`."""
    x, r, nw, w = inputs(1, n, k, torch.bfloat16)
    fused = dense.norm_linear(x, r, nw, EPS, w, min_block_n=min_block_n)
    assert fused is not None
    out, new_residual = fused
    expected, _ = reference(x, r, nw, w)
    normed, summed = norm_module.rms_norm(x, nw, EPS, r)
    unfused = gemv_module.linear(normed, w)
    scale = expected.abs().max()
    assert (out.float() - expected).abs().max() / scale < 1e-2
    assert (out.float() - expected).abs().max() <= 2 * (unfused.float() - expected).abs().max()
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_decode_with_the_norm_in_the_gemv(tiny_llama_dir, monkeypatch):
    """Greedy tokens of a float32 CUDA-graph decode (3 requests, then fewer) with the switch
    on equal those with it off (the fused path captured at 1-2 rows)."""
    from test_cuda_graph import _generate, _prompts

    def every_shape(rows, weight):  # the element-wise kernel for 1-2 rows, tensor cores above
        return ELEMENTWISE if rows <= 2 else DOT if rows <= gemv_module.MAX_ROWS else None

    monkeypatch.setattr(gemv_module, "decode_config", every_shape)
    unfused, _, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype="float32")
    monkeypatch.setenv("PEGBOARD_FUSED_NORM_GEMV", "1")
    fused, graphs, runner = _generate(
        tiny_llama_dir, _prompts(3), attention="triton", dtype="float32"
    )
    assert runner.cuda_graphs is not None and graphs[0].num_replays >= 15
    assert fused == unfused
