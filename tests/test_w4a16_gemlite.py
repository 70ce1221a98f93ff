"""The w4a16 plugin's gemlite path (`--w4a16-kernel gemlite`, `core/kernels/w4a16_gemlite.py`).

On CPU (gemlite is never imported there): the tensors handed to gemlite
(`plugins/linear/gemlite_layout.py`) hold exactly the de-quantized values of every checkpoint
format's layers, in the zero-point form and meta dtype the docs promise; the launch
configurations filled for shapes no table has stay inside gemlite's constraints; the option's
choices and errors. Marked `gpu` (skipped unless gemlite imports on a CUDA device): gemlite
against the de-quantized reference at every group size, Llama-3.1-8B's shapes and 1 to 64 rows
and prefill rows, inside a CUDA graph, tiny quantized models of every format, and an engine
serving with CUDA graphs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures import build_tiny_model
from fixtures.int4_layers import packed_layer
from fixtures.quantized import quantize_checkpoint, variant_id
from pegboard.core.kernels import w4a16_gemlite
from pegboard.plugins.linear.gemlite_layout import (
    GemliteLayout,
    dequantize_gemlite,
    plain_from_serving,
    serving_from_plain,
    to_gemlite,
)
from pegboard.plugins.linear.int4 import PackedInt4, dequantize_packed, pack_int32, pack_serving
from pegboard.plugins.linear.w4a16 import Int4Linear, W4A16Linear, W4A16Options

HAS_GEMLITE = torch.cuda.is_available() and (
    w4a16_gemlite.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None
)
gpu = pytest.mark.gpu
needs_gemlite = pytest.mark.skipif(not HAS_GEMLITE, reason="needs gemlite on a CUDA GPU")

#: (method, options) of every checkpoint variant, and the zero-point form gemlite gets for it.
VARIANTS = [
    ("gptq", {"sym": True}, "scalar"),  # z = 8 everywhere: one int32
    ("gptq", {"sym": False}, "shift"),
    ("gptq", {"sym": False, "desc_act": True}, "shift"),
    ("gptq", {"sym": True, "group_size": 128}, "scalar"),
    ("awq", {"sym": False}, "shift"),
    ("awq", {"sym": False, "group_size": 64}, "shift"),
    ("compressed-tensors", {"sym": True}, "scalar"),
    ("compressed-tensors", {"sym": False}, "shift"),
    ("compressed-tensors", {"sym": True, "desc_act": True}, "scalar"),
    ("gguf", {"sym": False}, "scalar"),  # the fixture writes Q4_0 (-8 d) for sym=False
    ("gguf", {"sym": True}, "fma"),  # and Q4_1 (d q + m) for sym=True
]


# -------------------------------------------------------------------------------- CPU


def test_gemlite_words_hold_eight_columns_in_order_and_convert_back():
    q = torch.randint(0, 16, (64, 48), dtype=torch.uint8)  # [K, N]
    serving = pack_serving(q)
    plain = plain_from_serving(serving)
    assert torch.equal(plain, pack_int32(q, dim=0))  # nibble j = column 8 w + j (GPTQ order)
    assert torch.equal(serving_from_plain(plain), serving)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    ("offsets", "form"), [("asym", "shift"), ("sym", "scalar"), ("float", "fma")]
)
@pytest.mark.parametrize("group", [32, 128, 256])
def test_converted_tensors_hold_the_dequantized_values(dtype, offsets, form, group):
    p = packed_layer(48, 256, group, dtype, offsets)
    g = to_gemlite(p, dtype)
    assert torch.equal(dequantize_gemlite(g, dtype), dequantize_packed(p, dtype))
    assert g.fma == (form == "fma")
    assert (g.zeros.dim() == 0) == (form == "scalar")
    if form == "scalar":
        assert g.zeros.dtype == torch.int32 and int(g.zeros) == 8
    # float16 scales (most are not exact in bf16): the meta dtype never rounds them
    assert torch.equal(g.scales.float(), p.scales.float())
    assert g.scales.dtype == torch.float16


def test_offsets_no_16_bit_type_holds_are_kept_in_float32():
    p = packed_layer(16, 64, 32, torch.bfloat16, "float")
    p.offsets = p.offsets.float() + 1e-6  # not representable in float16 or bf16
    g = to_gemlite(p, torch.bfloat16)
    assert g.fma and g.zeros.dtype == torch.float32 and g.scales.dtype == torch.float32
    assert torch.equal(dequantize_gemlite(g, torch.float32), dequantize_packed(p, torch.float32))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("gemlite") / "llama", "llama", hidden_size=128,
        intermediate_size=256,
    )  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_format_converts_to_its_dequantized_weights(variant, source_dir, tmp_path):
    from pegboard.core.model_runner import ModelRunner
    from test_quant_formats import _linear_choice

    method, opts, form = variant
    q_dir, _ = quantize_checkpoint(source_dir, tmp_path / method, method, **opts)
    runner = ModelRunner(q_dir, "bfloat16", "cpu", progress=False,
                         linear=_linear_choice(method, q_dir))  # fmt: skip
    layers = [
        m for m in runner.model.modules() if isinstance(m, Int4Linear) and m.qweight is not None
    ]
    assert len(layers) >= 6
    for layer in layers:
        packed = PackedInt4(layer.qweight, layer.scales, layer.offsets, layer.group_size, None)
        g = to_gemlite(packed, torch.bfloat16)
        assert torch.equal(
            dequantize_gemlite(g, torch.bfloat16), dequantize_packed(packed, torch.bfloat16)
        ), layer.spec.name
        assert (g.fma, g.zeros.dim() == 0) == (form == "fma", form == "scalar"), layer.spec.name
    if opts.get("desc_act"):  # activation order: x is permuted, gemlite sees contiguous groups
        assert any(layer.perm is not None for layer in layers)


@pytest.mark.parametrize("kind", ["GEMV_REVSPLITK", "GEMM_SPLITK", "GEMM"])
@pytest.mark.parametrize("group", [32, 64, 128, 4096])
@pytest.mark.parametrize("rows", [1, 2, 16, 24, 64, 96, 4096])
@pytest.mark.parametrize("n", [64, 6144])
def test_fallback_configs_stay_inside_gemlites_constraints(kind, group, rows, n):
    k = 4096
    cfg = w4a16_gemlite.fallback_config(kind, rows, n, k, group)
    bk, bn = cfg["BLOCK_SIZE_K"], cfg["BLOCK_SIZE_N"]
    assert bk & (bk - 1) == 0 and bn & (bn - 1) == 0 and bn <= max(n, 16)
    if kind == "GEMV_REVSPLITK":  # one scale per program for its two K slices
        assert cfg["BLOCK_SIZE_M"] == 1 and 8 <= bk and 2 * bk <= group
    else:  # tl.dot steps of 32+ columns inside one group
        assert 32 <= bk <= group and cfg["BLOCK_SIZE_M"] >= min(16, rows)
        assert k % (bk * cfg.get("SPLIT_K", 1)) == 0
    assert {"num_warps", "num_stages"} <= set(cfg)


def test_rows_pick_the_kernel():
    assert [w4a16_gemlite.matmul_type(m) for m in (1, 2, 4, 64, 65, 4096)] == [
        "GEMV_REVSPLITK", "GEMM_SPLITK", "GEMM_SPLITK", "GEMM_SPLITK", "GEMM", "GEMM",
    ]  # fmt: skip


def test_prepare_fills_only_the_signatures_no_table_has(monkeypatch):
    # gemlite itself cannot be imported without a GPU: its two module globals `prepare` reads
    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    cache = {"GEMM_SPLITK": {"(16, 6144, 4096, 128, 8, 104)": {"tuned": True}}}
    core = types.SimpleNamespace(GEMLITE_TRITON_CONFIG_CACHE=cache)
    utils = types.SimpleNamespace(M_MAPPING=[0] + [next(b for b in buckets if b >= m)
                                                   for m in range(1, 129)])  # fmt: skip
    gemlite = types.ModuleType("gemlite")
    gemlite.core = core
    monkeypatch.setitem(sys.modules, "gemlite", gemlite)
    monkeypatch.setitem(sys.modules, "gemlite.core", core)
    monkeypatch.setitem(sys.modules, "gemlite.triton_kernels", types.ModuleType("tk"))
    monkeypatch.setitem(sys.modules, "gemlite.triton_kernels.utils", utils)
    monkeypatch.setattr(w4a16_gemlite, "_gemlite", lambda: gemlite)
    assert w4a16_gemlite.prepare(6144, 4096, 128, torch.bfloat16) == len(buckets) - 1
    assert cache["GEMM_SPLITK"]["(16, 6144, 4096, 128, 8, 104)"] == {"tuned": True}  # kept
    assert set(cache["GEMV_REVSPLITK"]) == {"(1, 6144, 4096, 128, 8, 104)"}
    assert set(cache["GEMM"]) == {"(96, 6144, 4096, 128, 8, 104)", "(128, 6144, 4096, 128, 8, 104)"}
    assert w4a16_gemlite.prepare(6144, 4096, 128, torch.float16) == 0  # fp16: the same key


def test_layers_switch_to_gemlites_layout_and_back(source_dir, tmp_path, monkeypatch):
    # the plugin's wiring, with gemlite's matmul replaced by its layout's de-quantized product
    from pegboard.core.model_runner import ModelRunner
    from test_quant_formats import _linear_choice

    _stand_in_gemlite(monkeypatch, _dequantized_gemlite)
    q_dir, _ = quantize_checkpoint(source_dir, tmp_path / "gptq", "gptq", sym=False, desc_act=True)
    runner = ModelRunner(q_dir, "float32", "cpu", progress=False,
                         linear=_linear_choice("gptq", q_dir))  # fmt: skip
    layer = runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.perm is not None  # activation order: x is permuted before either kernel
    x = torch.randn(5, 128)
    serving, expected = layer.qweight.clone(), layer(x)
    layer.set_fused_kernels(True)  # auto (preferring gemlite here): gemlite where it imports
    assert (
        layer.gemlite is not None and layer.qweight is None and layer.kernel is _dequantized_gemlite
    )
    assert layer.describe() == "w4a16 g32, gemlite kernels"
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.set_fused_kernels(False)
    assert layer.gemlite is None and torch.equal(layer.qweight, serving)  # rebuilt exactly
    layer.kernel_choice = "triton"
    layer.set_fused_kernels(True)
    assert layer.gemlite is None and layer.kernel is not _dequantized_gemlite


def _dequantized_gemlite(x, qweight, scales, zeros, group_size, fma, bias=None):
    """gemlite's matmul stood in by its layout's de-quantized product."""
    g = GemliteLayout(qweight, scales, zeros, group_size, fma)
    return torch.nn.functional.linear(x, dequantize_gemlite(g, x.dtype), bias)


def _stand_in_gemlite(monkeypatch, matmul) -> None:
    from pegboard.plugins.linear import w4a16

    monkeypatch.setattr(w4a16_gemlite, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(w4a16_gemlite, "prepare", lambda *a: 0)
    monkeypatch.setattr(w4a16_gemlite, "gemlite_linear", matmul)
    monkeypatch.setattr(w4a16, "_gemlite_checked", {})
    monkeypatch.setattr(w4a16, "AUTO_PREFERS_GEMLITE", True)  # as if measured faster


def test_a_gemlite_giving_wrong_results_is_caught_at_load_and_not_used(monkeypatch):
    from pegboard.sdk.linear import LinearSpec, QuantizationConfig

    _stand_in_gemlite(monkeypatch, lambda x, qweight, *a, **k: x.new_zeros(x.shape[0], 64))
    method = W4A16Linear().linear_kernel(_info(), QuantizationConfig("gptq", group_size=32))
    layers = [method.create(LinearSpec(f"model.layers.{i}.mlp.down_proj", 96, 64)) for i in (0, 1)]
    for layer in layers:
        layer.fill_random(torch.Generator().manual_seed(0))
        layer.set_fused_kernels(True)
        assert layer.gemlite is None and layer.kernel is not None  # pegboard's kernels
        assert "not gemlite: its self-check failed: GEMV_REVSPLITK is" in layer.describe()


def test_auto_runs_pegboards_kernels_until_gemlite_is_measured_and_gemlite_when_named(monkeypatch):
    from pegboard.plugins.linear import w4a16
    from pegboard.sdk.linear import LinearSpec, QuantizationConfig

    _stand_in_gemlite(monkeypatch, _dequantized_gemlite)
    monkeypatch.setattr(w4a16, "AUTO_PREFERS_GEMLITE", False)  # the shipped setting
    method = W4A16Linear().linear_kernel(_info(), QuantizationConfig("gptq", group_size=32))
    layer = method.create(LinearSpec("model.layers.0.mlp.down_proj", 96, 64))
    layer.fill_random(torch.Generator().manual_seed(0))
    layer.set_fused_kernels(True)
    assert layer.gemlite is None and layer.kernel is not _dequantized_gemlite  # auto: pegboard's
    layer.set_fused_kernels(False)
    layer.kernel_choice = "gemlite"
    layer.set_fused_kernels(True)
    assert layer.gemlite is not None and layer.kernel is _dequantized_gemlite


def test_a_layer_gemlite_cannot_take_runs_pegboards_kernels_and_says_why(monkeypatch):
    from pegboard.sdk.linear import LinearSpec, QuantizationConfig

    monkeypatch.setattr(w4a16_gemlite, "unavailable_reason", lambda device, dtype: None)
    spec = LinearSpec("model.layers.0.mlp.down_proj", 96, 64)  # K = 96: whole groups of 32
    layer = (
        W4A16Linear(W4A16Options(kernel="gemlite"))
        .linear_kernel(_info(), QuantizationConfig("gptq", group_size=32))
        .create(spec)
    )
    layer.fill_random(torch.Generator().manual_seed(0))
    monkeypatch.setattr(w4a16_gemlite, "shape_unsupported_reason", lambda n, k, g: "K=96 (test)")
    layer.set_fused_kernels(True)
    assert layer.gemlite is None and layer.kernel is not None
    assert "not gemlite: K=96 (test)" in layer.describe()


def _info():
    from pegboard.sdk.types import ModelInfo

    return ModelInfo(architecture="llama", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                     hidden_size=32, vocab_size=64, max_model_len=64, dtype=torch.float32,
                     device=torch.device("cpu"))  # fmt: skip


def _gemlite_on_cpu(mode: str) -> list:
    """Run tests/fixtures/gemlite_cpu.py in `mode` (a process standing in a GPU for gemlite)."""
    script = Path(__file__).parent / "fixtures" / "gemlite_cpu.py"
    run = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


needs_gemlite_package = pytest.mark.skipif(
    importlib.util.find_spec("gemlite") is None or torch.cuda.is_available(),
    reason="needs gemlite installed (the dev extra); on a GPU the gpu tests run it",
)


@needs_gemlite_package
def test_gemlites_own_kernels_match_the_reference_in_the_interpreter():
    # gemlite's real GEMV_REVSPLITK and GEMM_SPLITK kernels, called as the plugin calls them,
    # with the configurations `prepare` fills
    results = _gemlite_on_cpu("interpret")
    assert len(results) == 18
    assert [(case, err) for case, err in results if not err < 2e-3] == []


@pytest.mark.slow
@needs_gemlite_package
def test_gemlites_kernels_compile_for_sm90_with_the_configurations_pegboard_gives_them():
    # H100-table and fallback configurations, all three kernels, bf16 (what the interpreter
    # cannot run): every launch compiles for sm_90 within an H200's shared memory, also when
    # this process runs the interpreter (the script clears TRITON_INTERPRET for `compile`)
    results = _gemlite_on_cpu("compile")
    assert len(results) == 12
    assert [(case, got) for case, got in results if not isinstance(got, int)] == []
    assert max(got for _, got in results) <= 232448


def test_gemlite_is_never_used_on_cpu_and_says_why():
    cpu = torch.device("cpu")
    assert "CUDA" in w4a16_gemlite.unavailable_reason(cpu, torch.bfloat16)
    assert w4a16_gemlite.shape_unsupported_reason(1536, 576, 32) is None  # SmolLM2's K
    assert "K=100" in w4a16_gemlite.shape_unsupported_reason(64, 100, 100)


def test_kernel_option_defaults_to_auto_and_rejects_other_names():
    import pydantic

    assert W4A16Linear().options.kernel == "auto"
    assert W4A16Linear(W4A16Options(kernel="gemlite")).options.kernel == "gemlite"
    with pytest.raises(pydantic.ValidationError):
        W4A16Options(kernel="no-such-kernel")


# -------------------------------------------------------------------------------- GPU

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@functools.lru_cache(maxsize=16)
def _llama_layer(n: int, k: int, group: int):
    """A packed bf16 layer (made once per shape and group: packing on the CPU takes seconds)
    and its gemlite layout, configurations prepared."""
    p = packed_layer(n, k, group, torch.bfloat16, "asym", device="cuda")
    w4a16_gemlite.prepare(n, k, group, torch.bfloat16)
    return p, to_gemlite(p, torch.bfloat16)


def _reference(x: torch.Tensor, p: PackedInt4) -> torch.Tensor:
    w = dequantize_packed(p, torch.float32).to(x.dtype).double()
    return x.double() @ w.t()


def _run(x, g, bias=None):
    return w4a16_gemlite.gemlite_linear(x, g.qweight, g.scales, g.zeros, g.group_size, g.fma, bias)


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@gpu
@needs_gemlite
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 24, 64, 100, 1000])
def test_gemlite_matches_the_dequantized_reference_on_llama_shapes(group, shape, rows):
    n, k = shape
    p, layout = _llama_layer(n, k, k if group == -1 else group)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    assert _rel(_run(x, layout), _reference(x, p)) < 1e-2


@gpu
@needs_gemlite
@pytest.mark.parametrize("offsets", ["sym", "float"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_gemlite_scalar_zero_and_fma_forms_with_bias(offsets, dtype, rows):
    p = packed_layer(1024, 2048, 32, dtype, offsets, device="cuda")
    layout = to_gemlite(p, dtype)
    w4a16_gemlite.prepare(1024, 2048, 32, dtype)
    x = torch.randn(2, rows, 2048, device="cuda").to(dtype)  # leading dimensions kept
    bias = torch.randn(1024, device="cuda").to(dtype)
    got = _run(x, layout, bias)
    assert got.shape == (2, rows, 1024)
    assert _rel(got.reshape(-1, 1024), _reference(x.reshape(-1, 2048), p) + bias.double()) < 1e-2


@gpu
@needs_gemlite
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_gemlite_replays_in_a_cuda_graph_without_host_syncs(rows):
    p, layout = _llama_layer(4096, 4096, 128)
    x = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
    _run(x, layout)  # the autotuner's first call per key: outside the capture, as the engine does
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a call after the first never waits for the GPU
    try:
        _run(x, layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run(x, layout)
    for _ in range(2):  # replayed twice: the atomics' output is zeroed inside the graph
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert _rel(out, _reference(x, p)) < 1e-2


@gpu
@needs_gemlite
@pytest.mark.parametrize(
    ("method", "sym"),
    [("gptq", False), ("gptq", True), ("awq", False), ("compressed-tensors", False),
     ("gguf", False), ("gguf", True)],  # GGUF: Q4_0, Q4_1
)  # fmt: skip
def test_quantized_model_through_gemlite_matches_its_dequantized_run(
    method, sym, source_dir, tmp_path
):
    from test_quant_kernels import w4a16_errors

    if method == "gguf":
        pytest.importorskip("gguf")  # carried to the GPU machine (pure Python)
    q_dir, deq_dir = quantize_checkpoint(source_dir, tmp_path / method, method, sym=sym)
    runner, err, baseline = w4a16_errors(q_dir, deq_dir, method, "gemlite")
    assert runner.model.model.layers[0].mlp.gate_up_proj.gemlite is not None
    # as for pegboard's kernels (test_quant_kernels.w4a16_errors): about as far from the
    # float32 oracle as the de-quantized bf16 run is
    assert err < 1.5 * baseline + 2e-3, f"error {err:.2e} vs bf16's own {baseline:.2e}"


@gpu
@needs_gemlite
def test_engine_serves_gemlite_layers_through_cuda_graphs(source_dir, tmp_path):
    from fixtures.devices import GPU_ENGINE
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    q_dir, _ = quantize_checkpoint(source_dir, tmp_path / "gptq", "gptq", group_size=64, sym=False)
    prompts = [list(range(5 + i, 12 + 2 * i)) for i in range(5)]  # batch 5: padded graph size 8
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def tokens(**settings):
        options = {"plugin_options": {"w4a16": {"kernel": "gemlite"}}, "cuda_graph_max_bs": 8,
                   "cuda_graph_mixed_max_tokens": 64}  # fmt: skip
        with LLM(str(q_dir), **(GPU_ENGINE | options | settings)) as llm:
            layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
            assert layer.gemlite is not None and "gemlite" in layer.describe()
            out = [o.token_ids for o in llm.generate(prompts, params)]
            return out, llm.engine.runner.cuda_graphs

    graphed, graphs = tokens()
    assert graphs is not None  # decode steps ran as graph replays
    eager, none = tokens(disable_cuda_graph=True)
    assert none is None
    # split-K atomics sum in any order: allow a near-tie to flip late tokens, not the first
    assert [t[:2] for t in graphed] == [t[:2] for t in eager]
