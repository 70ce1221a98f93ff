"""SiLU-and-mul inside the down projection's GEMV (`gemv(..., gate_up=True)`,
`dense.silu_linear`, `PEGBOARD_FUSED_SILU_DOWN`): bit for bit the separate
`activation.silu_and_mul` kernel followed by the GEMV, for every kernel layout (element-wise,
tensor cores, split K, ragged K) and in the decoder.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes; the `gpu` tests run
the measured down-projection configurations at their real shapes and a graph-captured decode.
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
from pegboard.core.kernels.gemv import MAX_ROWS, GemvConfig, gemv  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models import layers  # noqa: E402
from pegboard.core.models.layers import Linear  # noqa: E402
from pegboard.core.models.llama import DecoderMLP  # noqa: E402
from test_fused_kernels import prefill_logits  # noqa: E402
from test_gemv import DEVICE, DOT, DOT_SPLIT, ELEMENTWISE, SPLIT, randn  # noqa: E402

CONFIGS = [ELEMENTWISE, SPLIT, DOT, DOT_SPLIT]
IDS = ["gemv", "split", "dot", "dot-split"]


def gate_up_rows(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Gate/up rows whose gates straddle SiLU's bend (and whose products round in bf16)."""
    return randn(rows, 2 * k, dtype=torch.float32, seed=rows).mul(3).to(dtype)


@pytest.fixture
def separate_calls(monkeypatch):
    """Rows of each call of the separate SiLU-and-mul kernel."""
    calls: list[int] = []
    real = activation.silu_and_mul

    def spy(gate_up):
        calls.append(gate_up.numel() // gate_up.shape[-1])
        return real(gate_up)

    monkeypatch.setattr(activation, "silu_and_mul", spy)
    return calls


# ------------------------------------------------------------------ kernels, CPU interpreter


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize(
    ("rows", "dtype"), [(1, torch.bfloat16), (3, torch.bfloat16), (1, torch.float32)]
)
def test_gate_up_gemv_equals_silu_and_mul_then_gemv_bit_for_bit(config, rows, dtype):
    # K = 200 is no multiple of the K blocks; N = 37 leaves the last row block partly empty.
    gate_up, w = gate_up_rows(rows, 200, dtype), randn(37, 200, dtype=dtype, seed=1)
    b = randn(37, dtype=dtype, seed=2)
    expected = gemv(activation.silu_and_mul(gate_up), w, b, config)
    out = gemv(gate_up, w, b, config, gate_up=True)
    assert out.shape == (rows, 37) and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("config", [ELEMENTWISE, SPLIT], ids=["gemv", "split"])
def test_gate_up_gemv_writes_into_a_buffer_slot_and_keeps_leading_dimensions(config):
    gate_up = gate_up_rows(2, 64, torch.bfloat16).view(2, 1, 128)
    w = randn(24, 64, dtype=torch.bfloat16, seed=1)
    expected = gemv(activation.silu_and_mul(gate_up), w, None, config)
    assert gemv(gate_up, w, None, config, gate_up=True).shape == (2, 1, 24)
    buffer = torch.zeros(2, 4, 24, dtype=torch.bfloat16, device=DEVICE)
    gemv(gate_up.view(2, 128), w, None, config, out=buffer[1, :2], gate_up=True)
    torch.testing.assert_close(buffer[1, :2], expected.view(2, 24), atol=0, rtol=0)
    assert not buffer[0].any() and not buffer[1, 2:].any()


def test_gate_up_gemv_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match="takes 128"):
        gemv(randn(1, 64), randn(24, 64), None, ELEMENTWISE, gate_up=True)


# ------------------------------------------------------------------ dispatch


def test_dense_linear_of_gate_up_fuses_where_the_gemv_takes_the_rows(
    decode_configs, separate_calls
):
    decode_configs[(torch.bfloat16, 24, 64)] = {1: ELEMENTWISE, 2: None, 8: SPLIT}
    w, b = randn(24, 64, dtype=torch.bfloat16, seed=1), randn(24, dtype=torch.bfloat16, seed=2)
    for rows, fused in [(1, True), (2, False), (5, True), (9, False)]:
        gate_up = gate_up_rows(rows, 64, torch.bfloat16)
        assert dense.takes_gate_up(rows, w) is fused
        expected = dense.linear(activation.silu_and_mul(gate_up), w, b)
        separate_calls.clear()
        out = dense.linear(gate_up, w, b, gate_up=True)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert separate_calls == ([] if fused else [rows])
    # a strided weight or a shape without configurations: separately
    strided = randn(24, 128, dtype=torch.bfloat16, seed=1)[:, :64]
    assert not dense.takes_gate_up(1, strided) and not dense.takes_gate_up(1, randn(8, 64))


def test_dense_layer_without_its_kernels_applies_silu_and_mul_to_gate_up_rows():
    layer = Linear(64, 24).to(DEVICE)
    gate_up = gate_up_rows(3, 64, torch.float32)
    expected = layer(layers.silu_and_mul(gate_up))
    torch.testing.assert_close(layer(gate_up, gate_up=True), expected, atol=0, rtol=0)


def test_switch_is_auto_by_default_and_read_when_kernels_switch_on(monkeypatch):
    mlp = _tiny_mlp()
    monkeypatch.delenv("PEGBOARD_FUSED_SILU_DOWN", raising=False)
    mlp.set_fused_kernels(True)
    assert mlp.takes_gate_up is dense.shares_silu
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "1")
    mlp.set_fused_kernels(True)
    assert mlp.takes_gate_up is dense.takes_gate_up
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "0")
    mlp.set_fused_kernels(True)
    assert mlp.takes_gate_up is None
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "1")
    mlp.set_fused_kernels(False)
    assert mlp.takes_gate_up is None


def test_auto_fuses_only_where_a_gemv_program_covers_enough_output_rows(decode_configs):
    """The default: TP=1's Llama down projection (2 rows per program) lost on the H200, its
    TP=2 shard (8 rows per program) won (`dense.SHARED_SILU_MIN_BLOCK_N`)."""
    decode_configs[(torch.bfloat16, 24, 64)] = {1: GemvConfig(2, 64), 2: GemvConfig(8, 64), 4: None}
    w = randn(24, 64, dtype=torch.bfloat16, seed=1)
    assert [dense.shares_silu(rows, w) for rows in (1, 2, 4)] == [False, True, False]
    assert [dense.takes_gate_up(rows, w) for rows in (1, 2, 4)] == [True, True, False]


def _tiny_mlp() -> DecoderMLP:
    from types import SimpleNamespace

    from pegboard.core.models.llama import dense_linear

    cfg = SimpleNamespace(intermediate_size=64, hidden_size=24, mlp_bias=False)
    return DecoderMLP(cfg, 0, dense_linear)


def test_decoder_with_fused_silu_down_equals_it_without(
    tiny_llama_dir, decode_configs, separate_calls, monkeypatch
):
    check_switch_drops_silu_and_mul(
        tiny_llama_dir, decode_configs, separate_calls, monkeypatch, "PEGBOARD_FUSED_SILU_DOWN"
    )


def check_switch_drops_silu_and_mul(model_dir, decode_configs, separate_calls, monkeypatch, env):
    """The tiny Llama with every projection on the GEMV: with switch `env` on (both SiLU
    fusions off before) the same logits bit for bit, no separate SiLU-and-mul call at up to 8
    rows, and one again at 9 (also `test_gemv_silu`)."""
    runner = ModelRunner(model_dir, "bfloat16", str(DEVICE), progress=False)
    model = runner.model
    shapes = {(m.weight.dtype, *m.weight.shape) for m in model.modules() if isinstance(m, Linear)}
    for key in shapes:
        decode_configs[key] = dict.fromkeys([1, 2, 4, 8], GemvConfig(8, 64))
    prompts = [[5, 9, 200, 17], [300, 2, 77]]  # 7 tokens: every projection runs as GEMV
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "0")
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_GATE_UP", "0")
    model.set_fused_kernels(True)
    expected = prefill_logits(runner, prompts)
    layers = model.config.num_layers
    assert separate_calls == [7] * layers
    separate_calls.clear()
    monkeypatch.setenv(env, "1")
    model.set_fused_kernels(True)
    torch.testing.assert_close(prefill_logits(runner, prompts), expected, atol=0, rtol=0)
    assert separate_calls == []
    # more rows than the GEMV takes: SiLU-and-mul runs separately again
    prompts = [[5, 9, 200, 17, 6], [300, 2, 77, 12]]
    assert len(prefill_logits(runner, prompts)) == 2 and separate_calls == [9] * layers


# ------------------------------------------------------------------ GPU, bf16, real shapes


def down_cases() -> list[tuple[int, int, int, GemvConfig]]:
    """(rows, N, K, config) of every measured bf16 down projection (Llama-3.1-8B at TP=1 and
    TP=2, Qwen3-0.6B), at the smallest and largest row count of each bucket."""
    downs = {(4096, 14336), (4096, 7168), (1024, 3072)}
    cases = []
    for (dtype, n, k), by_rows in gemv_module.DECODE_CONFIGS.items():
        for bucket, config in by_rows.items():
            if dtype == torch.bfloat16 and (n, k) in downs and config is not None:
                cases += [(rows, n, k, config) for rows in sorted({bucket // 2 + 1, bucket})]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k", "config"), down_cases())
def test_gpu_measured_down_configs_fuse_bit_for_bit(rows, n, k, config):
    gate_up = gate_up_rows(rows, k, torch.bfloat16)
    w = randn(n, k, dtype=torch.bfloat16, seed=n + k)
    expected = gemv(activation.silu_and_mul(gate_up), w, None, config)
    torch.testing.assert_close(
        gemv(gate_up, w, None, config, gate_up=True), expected, atol=0, rtol=0
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graph_decode_with_fused_silu_down_equals_unfused(tiny_llama_dir, dtype, monkeypatch):
    """Greedy tokens of a CUDA-graph decode (3 requests, then fewer) with the switch on equal
    those with it off; the fused path was captured."""
    from test_cuda_graph import _generate, _prompts

    def every_shape(rows, weight):  # the element-wise kernel for 1-2 rows, tensor cores above
        return ELEMENTWISE if rows <= 2 else DOT if rows <= MAX_ROWS else None

    monkeypatch.setattr(gemv_module, "decode_config", every_shape)
    fused_rows: list[int] = []
    real = dense.silu_linear

    def spy(gate_up, weight, bias=None, out=None):
        fused_rows.append(gate_up.numel() // gate_up.shape[-1])
        return real(gate_up, weight, bias, out)

    monkeypatch.setattr(dense, "silu_linear", spy)
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "0")
    unfused, _, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype=dtype)
    assert fused_rows == []
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "1")
    fused, graphs, runner = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype=dtype)
    assert runner.cuda_graphs is not None and graphs[0].num_replays >= 15
    assert fused == unfused
    assert {1, 2} <= set(fused_rows) and max(fused_rows) >= 3  # the graphs of 1, 2 and 3 (padded)


def test_tensor_parallel_down_projection_writes_the_fused_product_into_its_slot(
    decode_configs, separate_calls, monkeypatch
):
    """Under TP the down projection's forward is `_Joined.project`, which writes into this
    rank's symmetric-buffer slot through `Linear.kernel(..., out=)`: the MLP's gate/up rows go
    there with SiLU-and-mul inside the GEMV (a stand-in for the buffer and the norm)."""
    from types import SimpleNamespace

    from pegboard.core.distributed.fused_norm import _Joined

    mlp = _tiny_mlp().to(torch.bfloat16).to(DEVICE)
    torch.nn.init.normal_(mlp.gate_up_proj.weight)
    torch.nn.init.normal_(mlp.down_proj.weight)
    decode_configs[(torch.bfloat16, 24, 64)] = {1: ELEMENTWISE, 2: SPLIT}
    decode_configs[(torch.bfloat16, 128, 24)] = {1: ELEMENTWISE, 2: ELEMENTWISE}
    buffer = torch.zeros(2, 4, 24, dtype=torch.bfloat16, device=DEVICE)
    takes = [True]
    fused = SimpleNamespace(
        slot=lambda slot, rows: buffer[slot, :rows],
        takes=lambda rows: takes[0],
        all_reduce=lambda partial: partial,  # one rank
    )
    norm = SimpleNamespace(kernel=object(), forward=None)
    joined = _Joined(fused, mlp.down_proj, norm, 1)
    monkeypatch.setenv("PEGBOARD_FUSED_SILU_DOWN", "1")
    mlp.set_fused_kernels(True)
    for module in mlp.children():
        module.set_fused_kernels(True)
    x = randn(2, 24, dtype=torch.bfloat16, seed=5)
    out = mlp(x)
    assert out.data_ptr() == buffer[1].data_ptr() and joined.pending is out
    assert separate_calls == []
    expected = dense.linear(activation.silu_and_mul(mlp.gate_up_proj(x)), mlp.down_proj.weight)
    torch.testing.assert_close(buffer[1, :2], expected, atol=0, rtol=0)
    # a step the fused all-reduce does not take: the layer's own forward, still fused
    takes[0] = False
    separate_calls.clear()
    torch.testing.assert_close(mlp(x), expected, atol=0, rtol=0)
    assert joined.pending is None and separate_calls == []
