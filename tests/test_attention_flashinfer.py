"""The `flashinfer` attention backend.

On CPU: discovery and listing, the setup errors, the prebuilt-kernel directory, the page index
arrays handed to FlashInfer, and the CUDA graph padding rule against the core's capture sizes.
On CPU also the FP8 pool's path: the backend accepted with one, its e4m3 kernels named, each
layer's scales handed to store-KV and to FlashInfer's `run`.
On a GPU (`gpu` tests): bf16 outputs against the torch backend (decode with both decode
kernels, prefill, extend over a cached prefix, a mixed batch), the same over an FP8 pool with
scales (FlashInfer's e4m3 kernels against the torch backend over the same FP8 pool), a decode
step captured in a CUDA graph and replayed for a smaller batch (bf16 and FP8), no host sync in
`forward`, and greedy generation equal to the triton backend's (bf16 and FP8 KV). The GPU tests expect the kernels prebuilt
(`pegboard kernels build`, PEGBOARD_FLASHINFER_KERNELS) or nvcc to compile them.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core.cuda_graph import capture_sizes, padded_size
from pegboard.plugins.kernels import attention_flashinfer
from pegboard.plugins.kernels.attention_flashinfer import (
    FlashInferAttention,
    FlashInferAttentionOptions,
    page_arrays,
)
from pegboard.sdk.slots import PluginContext
from pegboard.sdk.types import KVPool, ModelInfo

GPU = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


def test_plugin_is_discovered_under_the_name_flashinfer():
    from pegboard.core.plugin_manager import PluginManager

    info = PluginManager().find("attention", "flashinfer")
    assert info.cls is FlashInferAttention
    # Without CUDA it is listed, but as unavailable with the reason (issue 10, item 19).
    assert info.state == "available" if GPU else info.state.startswith("unavailable: ")


def test_pegboard_plugins_lists_it_with_its_options(capsys):
    from pegboard.core.cli.main import main

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    entry = plugins["flashinfer"]
    assert entry["slot"] == "attention"
    assert entry["state"] == "available" if GPU else "needs a CUDA device" in entry["state"]
    options = {o["name"] for o in entry["options"]}
    assert {"kernel_dir", "jit", "decode_tensor_cores", "workspace_mb"} <= options


@pytest.mark.skipif(GPU, reason="checks the error on a machine without a GPU")
def test_selecting_it_on_cpu_says_why():
    with pytest.raises(RuntimeError, match="needs a CUDA device.*choose --attention torch"):
        FlashInferAttention().setup(PluginContext(device=torch.device("cpu")))


def test_selecting_it_without_flashinfer_says_why(monkeypatch):
    monkeypatch.setattr(attention_flashinfer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="`flashinfer-python` package, which is not installed"):
        FlashInferAttention().setup(PluginContext(device=torch.device("cuda")))


@pytest.mark.skipif(GPU, reason="checks the error on a machine without a GPU")
def test_an_engine_asking_for_it_on_cpu_fails_with_the_reason(tiny_llama_dir):
    from pegboard.core.llm import LLM

    with pytest.raises(Exception, match="flashinfer attention backend needs a CUDA device"):
        LLM(str(tiny_llama_dir), attention="flashinfer", device="cpu", kv_cache_tokens=256)


def test_options_reject_unknown_fields_and_bad_values():
    with pytest.raises(Exception, match="decode_tensor_cores"):
        FlashInferAttentionOptions(decode_tensor_cores="sometimes")
    with pytest.raises(Exception, match="extra"):
        FlashInferAttentionOptions(splits=2)


# ------------------------------------------------------------------ page arrays (host side)


def test_page_arrays_use_only_the_pages_covering_the_sequence():
    tables = [[7, 3, 11, 12], [2, 5, 6, 8]]  # tables may hold pages beyond the tokens
    indptr, indices, last = page_arrays([5, 8], tables, page_size=4, rows=2)
    assert indptr.tolist() == [0, 2, 4]
    assert indices.tolist() == [7, 3, 2, 5]
    assert last.tolist() == [1, 4]


def test_page_arrays_read_from_the_padded_table_equal_those_read_page_by_page():
    tables = [[7, 3, 11, 12], [2], [5, 6, 8, 9, 10]]
    seq_lens, rows = [5, 4, 17], 4
    array = np.zeros((3, 5), dtype=np.int32)  # the core's: each row's pages, then zeros
    for i, t in enumerate(tables):
        array[i, : len(t)] = t
    by_page = page_arrays(seq_lens, tables, page_size=4, rows=rows)
    by_array = page_arrays(seq_lens, tables, page_size=4, rows=rows, table=array)
    for a, b in zip(by_page, by_array):
        np.testing.assert_array_equal(a, b)
    assert by_array[1].tolist() == [7, 3, 2, 5, 6, 8, 9, 10, 0]


def test_page_arrays_pad_extra_rows_with_one_token_of_page_0():
    indptr, indices, last = page_arrays([3, 9], [[4], [1, 2, 6]], page_size=4, rows=5)
    assert indptr.tolist() == [0, 1, 4, 5, 6, 7]
    assert indices.tolist() == [4, 1, 2, 6, 0, 0, 0]
    assert last.tolist() == [3, 1, 1, 1, 1]


@pytest.mark.parametrize("max_bs", [1, 3, 8, 20, 64, 100, 256])
def test_a_replayed_batch_plans_the_wrapper_its_graph_was_captured_with(max_bs):
    """The backend plans a decode batch of n rows at the next power of two, and the captured
    graph of the size the core pads n to ran that same power of two."""
    sizes = capture_sizes(max_bs)
    for n in range(1, max_bs + 1):
        graph_size = padded_size(n, sizes)
        assert attention_flashinfer._pow2(n) == attention_flashinfer._pow2(graph_size), (n, sizes)


# ------------------------------------------------------------------ prebuilt kernels

flashinfer_kernels = attention_flashinfer.flashinfer_kernels


@pytest.fixture
def aot_dir_restored():
    """FlashInfer's AOT directory as it was before the test (use_kernel_dir changes it)."""
    pytest.importorskip("flashinfer", reason="flashinfer-python is not installed")
    from flashinfer.jit import env as jit_env

    before = jit_env.FLASHINFER_AOT_DIR
    yield jit_env
    jit_env.FLASHINFER_AOT_DIR = before


def _fake_kernel_dir(root, kernels, version):
    root.mkdir(parents=True)
    for k in kernels:
        (root / k.name).mkdir(parents=True)
        (root / k.name / f"{k.name}.so").write_bytes(b"\x7fELF")
    (root / "manifest.json").write_text(json.dumps({"flashinfer": version, "arch": "9.0a"}))
    return root


def test_a_kernel_dir_makes_its_kernels_prebuilt(aot_dir_restored, tmp_path):
    import flashinfer

    kernels = flashinfer_kernels.required_kernels(128, torch.bfloat16)
    assert [k.kind for k in kernels] == ["decode", "prefill"]
    root = _fake_kernel_dir(tmp_path / "k", kernels[:1], flashinfer.__version__)
    flashinfer_kernels.use_kernel_dir(root)
    assert aot_dir_restored.FLASHINFER_AOT_DIR == root.resolve()
    assert flashinfer_kernels.prebuilt(kernels[0])
    assert not flashinfer_kernels.prebuilt(kernels[1])


def test_a_kernel_dir_built_for_another_flashinfer_is_refused(aot_dir_restored, tmp_path):
    kernels = flashinfer_kernels.required_kernels(128, torch.bfloat16)
    root = _fake_kernel_dir(tmp_path / "k", kernels, "0.0.1")
    with pytest.raises(RuntimeError, match="built for flashinfer 0.0.1.*pegboard kernels build"):
        flashinfer_kernels.use_kernel_dir(root)


def test_a_missing_kernel_dir_is_an_error(aot_dir_restored, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flashinfer_kernels.use_kernel_dir(tmp_path / "nowhere")


def test_without_jit_a_kernel_that_is_not_prebuilt_fails_naming_the_command(
    aot_dir_restored, tmp_path
):
    import flashinfer

    kernels = flashinfer_kernels.required_kernels(128, torch.bfloat16)
    flashinfer_kernels.use_kernel_dir(_fake_kernel_dir(tmp_path / "k", [], flashinfer.__version__))
    with pytest.raises(RuntimeError, match="not prebuilt: batch_decode.*pegboard kernels build"):
        attention_flashinfer._check_prebuilt(kernels, jit=False)


def test_without_jit_missing_fp8_kernels_name_the_build_flag_for_them(aot_dir_restored, tmp_path):
    import flashinfer

    kernels = flashinfer_kernels.required_kernels(128, torch.bfloat16, FP8)
    flashinfer_kernels.use_kernel_dir(_fake_kernel_dir(tmp_path / "k", [], flashinfer.__version__))
    with pytest.raises(RuntimeError, match="not prebuilt: batch_decode.*_dtype_kv_e4m3_.*"
                       "pegboard kernels build --arch <sm> --kv-cache-dtype fp8_e4m3"):  # fmt: skip
        attention_flashinfer._check_prebuilt(kernels, jit=False)


def test_with_jit_a_kernel_that_is_not_prebuilt_is_a_warning(aot_dir_restored, tmp_path, caplog):
    import flashinfer

    kernels = flashinfer_kernels.required_kernels(128, torch.bfloat16)
    root = _fake_kernel_dir(tmp_path / "k", kernels[:1], flashinfer.__version__)
    flashinfer_kernels.use_kernel_dir(root)
    with caplog.at_level(logging.WARNING, logger="pegboard.flashinfer"):
        attention_flashinfer._check_prebuilt(kernels, jit=True)
    assert "will compile batch_prefill" in caplog.text and "batch_decode" not in caplog.text


def test_unsupported_head_sizes_and_dtypes_are_named():
    pytest.importorskip("flashinfer", reason="flashinfer-python is not installed")
    with pytest.raises(ValueError, match="head sizes .* not 96"):
        flashinfer_kernels.required_kernels(96, torch.bfloat16)
    with pytest.raises(ValueError, match="not torch.float32"):
        flashinfer_kernels.required_kernels(128, torch.float32)
    with pytest.raises(
        ValueError, match="read KV caches of .*float8_e4m3fn.* not torch.float8_e5m2"
    ):
        flashinfer_kernels.required_kernels(128, torch.bfloat16, torch.float8_e5m2)


# ------------------------------------------------------------------ FP8 pools (host side)


def tiny_info(layers: int = 2) -> ModelInfo:
    return ModelInfo("Test", layers, 4, 2, 128, 32, 100, 4096, torch.bfloat16, torch.device("cpu"))


def test_an_fp8_pool_is_accepted_with_the_flashinfer_backend():
    from pegboard.core.models.quantization import check_kv_dtype

    pool = KVPool.allocate(tiny_info(), 2, 16, dtype=FP8)
    backend = object.__new__(attention_flashinfer.FlashInferAttentionBackend)  # (needs a GPU)
    check_kv_dtype(backend, pool, "flashinfer")  # raises for a backend that cannot read FP8


def test_an_fp8_pool_needs_the_e4m3_decode_and_prefill_kernels():
    pytest.importorskip("flashinfer", reason="flashinfer-python is not installed")
    bf16 = flashinfer_kernels.required_kernels(128, torch.bfloat16)
    fp8 = flashinfer_kernels.required_kernels(128, torch.bfloat16, FP8)
    assert [k.kind for k in fp8] == ["decode", "prefill"]
    assert all("dtype_q_bf16_dtype_kv_e4m3_dtype_o_bf16" in k.name for k in fp8)
    assert {k.kv_dtype for k in fp8} == {"float8_e4m3fn"} and {k.dtype for k in fp8} == {"bfloat16"}
    assert not {k.name for k in fp8} & {k.name for k in bf16}  # separate modules


class RecordingWrapper:
    """Stands in for a planned FlashInfer wrapper: records what `run` got."""

    def __init__(self):
        self.calls: list[dict] = []

    def run(self, q, paged_kv_cache, out, **kw):
        self.calls.append({"cache": paged_kv_cache, **kw})
        return out


@pytest.mark.parametrize("is_decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_forward_hands_each_layers_scales_to_store_kv_and_to_flashinfer(is_decode, kv_dtype):
    from types import SimpleNamespace

    info = tiny_info(layers=2)
    pool = KVPool.allocate(info, 2, 16, dtype=kv_dtype)
    if kv_dtype is FP8:
        pool.k_scales, pool.v_scales = [0.5, 2.0], [0.25, 4.0]
    backend = object.__new__(attention_flashinfer.FlashInferAttentionBackend)  # (needs a GPU)
    backend.pool, backend.is_decode, backend.decode_rows = pool, is_decode, 3
    backend.planned = RecordingWrapper()
    backend.batch = SimpleNamespace(slot_mapping=torch.tensor([0, 1, 2]))
    stored = []
    backend.store_kv = lambda k, v, kc, vc, slots, *scales: stored.append((kc, vc, scales))
    q, kv = torch.zeros(3, 4, 128), torch.zeros(3, 2, 128)
    for layer in (0, 1):
        assert backend.forward(layer, q, kv, kv).shape == q.shape
    calls = backend.planned.calls
    for layer, (call, store) in enumerate(zip(calls, stored, strict=True)):
        assert call["cache"][0] is pool.k[layer] and call["cache"][1] is pool.v[layer]
        assert store[0] is pool.k[layer] and store[1] is pool.v[layer]
        assert store[2] == (pool.k_scale(layer), pool.v_scale(layer))  # e4m3 = value / scale
    if kv_dtype is FP8:  # FlashInfer folds k_scale into the softmax scale, multiplies by v_scale
        assert [(c["k_scale"], c["v_scale"]) for c in calls] == [(0.5, 0.25), (2.0, 4.0)]
    else:  # a bf16 pool's run gets no scales (FlashInfer then does no extra multiply)
        assert all("k_scale" not in c and "v_scale" not in c for c in calls)


# ------------------------------------------------------------------ GPU, realistic shapes

if GPU:
    from pegboard.plugins.kernels.attention_flashinfer import FlashInferAttentionBackend
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend
    from test_attention_triton import make_case  # noqa: E402  (shares the case builder)


def gpu_case(
    cached: list[int], new: list[int], heads: int = 32, kv_heads: int = 8, fp8: bool = False
):
    """A one-layer step in bf16; with `fp8`, over an FP8 pool with scales 2 (K) and 0.5 (V)
    (powers of two: the torch reference's rescaling is exact) holding the cached keys and
    values as store-KV writes them (value / scale in e4m3)."""
    case = make_case(cached, new, 16, heads, kv_heads, 128, torch.bfloat16, seed=0, layers=1)
    if fp8:
        k_scale, v_scale = 2.0, 0.5
        case.pool = KVPool(
            k=[(t.float() / k_scale).to(FP8) for t in case.pool.k],
            v=[(t.float() / v_scale).to(FP8) for t in case.pool.v],
            page_size=case.pool.page_size,
            k_scales=[k_scale],
            v_scales=[v_scale],
        )
    return case


def run_backend(cls, case, **kw):
    pool = copy.deepcopy(case.pool)
    backend = cls(case.info, pool, **kw)
    backend.prepare(case.batch)
    return backend.forward(0, case.q, case.k, case.v), pool, backend


def assert_matches_torch(case, **kw):
    out, pool, _ = run_backend(FlashInferAttentionBackend, case, **kw)
    expected, expected_pool, _ = run_backend(TorchAttentionBackend, case)
    assert out.shape == case.q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)
    assert torch.equal(pool.k[0], expected_pool.k[0]) and torch.equal(pool.v[0], expected_pool.v[0])


@pytest.mark.gpu
@pytest.mark.parametrize("cores", ["on", "off"])
def test_gpu_bf16_decode_64_requests_of_1024_tokens_matches_torch(cores):
    assert_matches_torch(gpu_case([1023] * 64, [1] * 64), decode_tensor_cores=cores)


@pytest.mark.gpu
@pytest.mark.parametrize("cores", ["on", "off"])
def test_gpu_bf16_decode_of_uneven_lengths_matches_torch(cores):
    case = gpu_case([0, 15, 16, 17, 4000, 333], [1] * 6)
    assert_matches_torch(case, decode_tensor_cores=cores)


@pytest.mark.gpu
def test_gpu_bf16_decode_with_group_size_7_uses_tensor_cores_and_matches_torch():
    case = gpu_case([100, 700], [1, 1], heads=28, kv_heads=4)
    out, _, backend = run_backend(FlashInferAttentionBackend, case)
    assert backend.tensor_cores
    expected, _, _ = run_backend(TorchAttentionBackend, case)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_bf16_prefill_matches_torch():
    assert_matches_torch(gpu_case([0, 0, 0], [1024, 777, 3]))


@pytest.mark.gpu
def test_gpu_bf16_extend_over_a_cached_prefix_matches_torch():
    assert_matches_torch(gpu_case([512, 1536, 16, 5], [256, 512, 33, 100]))


@pytest.mark.gpu
def test_gpu_bf16_prefill_mixed_with_decodes_matches_torch():
    assert_matches_torch(gpu_case([0, 0, 512, 0, 100, 2000], [1024, 777, 256, 1, 1, 1]))


@pytest.mark.gpu
@pytest.mark.parametrize("new", [[1] * 5, [300, 1, 40, 1, 1]], ids=["decode", "mixed"])
def test_gpu_strided_qkv_views_match_torch(new):
    """q, k and v as the model passes them: column slices of one fused qkv output."""
    case = gpu_case([100, 0, 900, 15, 2000], new)
    qkv = torch.cat([t.flatten(1) for t in (case.q, case.k, case.v)], dim=1)
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=1)
    case.q, case.k, case.v = (t.view(-1, t.shape[1] // 128, 128) for t in (q, k, v))
    assert not case.q.is_contiguous()
    assert_matches_torch(case)


def assert_fp8_matches_torch(case, **kw):
    """FlashInfer's e4m3 kernels against the torch backend over the same FP8 pool; the new
    keys and values stored bit for bit as the triton backend stores them."""
    assert case.pool.is_fp8
    out, pool, _ = run_backend(FlashInferAttentionBackend, case, **kw)
    expected, _, _ = run_backend(TorchAttentionBackend, case)
    _, triton_pool, _ = run_backend(TritonAttentionBackend, case)
    assert out.shape == case.q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)
    for got, want in ((pool.k[0], triton_pool.k[0]), (pool.v[0], triton_pool.v[0])):
        assert got.dtype == FP8 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("cores", ["on", "off"])
def test_gpu_fp8_decode_64_requests_of_1024_tokens_matches_torch(cores):
    assert_fp8_matches_torch(gpu_case([1023] * 64, [1] * 64, fp8=True), decode_tensor_cores=cores)


@pytest.mark.gpu
@pytest.mark.parametrize("cores", ["auto", "on"])
def test_gpu_fp8_decode_of_qwen3_heads_and_uneven_lengths_matches_torch(cores):
    """16 query / 8 KV heads (Qwen3-0.6B, group 2: `auto` is the CUDA-core decode kernel)."""
    case = gpu_case([0, 15, 16, 17, 4000, 333, 1100], [1] * 7, heads=16, kv_heads=8, fp8=True)
    out, _, backend = run_backend(FlashInferAttentionBackend, case, decode_tensor_cores=cores)
    assert backend.tensor_cores == (cores == "on")
    assert_fp8_matches_torch(case, decode_tensor_cores=cores)


@pytest.mark.gpu
def test_gpu_fp8_prefill_matches_torch():
    assert_fp8_matches_torch(gpu_case([0, 0, 0], [1024, 777, 3], fp8=True))


@pytest.mark.gpu
def test_gpu_fp8_extend_over_a_cached_prefix_matches_torch():
    assert_fp8_matches_torch(gpu_case([512, 1536, 16, 5], [256, 512, 33, 100], fp8=True))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [32, 16])
def test_gpu_fp8_prefill_mixed_with_decodes_matches_torch(heads):
    case = gpu_case([0, 0, 512, 0, 100, 2000], [1024, 777, 256, 1, 1, 1], heads=heads, fp8=True)
    assert_fp8_matches_torch(case)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_decode_graph_captured_for_8_replays_a_batch_of_5(fp8):
    """As the core's graph runner does: capture a decode step of 8 rows reading a static slot
    buffer, then prepare a different batch of 5, pad it to 8 (slot -1) and replay."""
    capture = gpu_case([2047] * 8, [1] * 8, fp8=fp8)
    real = gpu_case([3, 900, 16, 64, 1500], [1] * 5, fp8=fp8)
    pool = copy.deepcopy(real.pool)  # the capture batch's pages are dummies: write none there
    backend = FlashInferAttentionBackend(real.info, pool)
    backend.prepare_for_capture(8)
    q = torch.zeros(8, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(8, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    slots = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    capture.batch.slot_mapping = slots
    capture.batch.page_tables_cpu = [[0] * 128] * 8
    backend.prepare(capture.batch)
    backend.forward(0, q, k, v)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(0, q, k, v)

    backend.prepare(real.batch)
    q[:5], k[:5], v[:5] = real.q, real.k, real.v
    slots[:5] = real.batch.slot_mapping
    graph.replay()
    expected, expected_pool, _ = run_backend(TorchAttentionBackend, real)
    torch.testing.assert_close(out[:5].float(), expected.float(), atol=2e-2, rtol=0)
    if fp8:  # e4m3 bytes as the triton backend's store-KV writes them
        expected_pool = run_backend(TritonAttentionBackend, real)[1]
    for got, want in ((pool.k[0], expected_pool.k[0]), (pool.v[0], expected_pool.v[0])):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_decode_metadata_stays_at_fixed_addresses_after_prepare_for_capture():
    case = gpu_case([100] * 3, [1] * 3)
    backend = FlashInferAttentionBackend(case.info, case.pool)
    backend.prepare_for_capture(16)
    ptrs = [t.data_ptr() for t in (backend.kv_indptr, backend.kv_indices, backend.kv_last_page_len)]
    wrappers = dict(backend.graph_decode)
    for batch in (case.batch, gpu_case([7] * 16, [1] * 16).batch, gpu_case([0], [9]).batch):
        backend.prepare(batch)
    assert [
        t.data_ptr() for t in (backend.kv_indptr, backend.kv_indices, backend.kv_last_page_len)
    ] == ptrs
    assert backend.graph_decode == wrappers and sorted(wrappers) == [1, 2, 4, 8, 16]


@pytest.mark.gpu
def test_gpu_forward_never_synchronizes_with_the_device():
    for case in (
        gpu_case([500] * 8, [1] * 8),
        gpu_case([0, 300], [200, 1]),
        gpu_case([500] * 8, [1] * 8, fp8=True),  # the scales are host floats: no device read
        gpu_case([0, 300], [200, 1], fp8=True),
    ):
        backend = FlashInferAttentionBackend(case.info, case.pool)
        backend.prepare(case.batch)
        backend.forward(0, case.q, case.k, case.v)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.forward(0, case.q, case.k, case.v)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def assert_greedy_agrees_up_to_near_ties(reference, other, gap: float = 0.1) -> int:
    """Each completion of `other` equals `reference`'s token for token, except that where they
    first part the reference's logprobs must show a near-tie (its choice and `other`'s within
    `gap` nats, which bf16 rounding in another kernel may flip); later tokens then follow other
    contexts and are not compared. Returns how many tokens were compared equal."""
    equal = 0
    for ref, out in zip(reference, other):
        for step, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
            if a == b:
                equal += 1
                continue
            choice = ref.logprobs[step]
            alternatives = dict(choice.top)
            detail = (
                f"prompt {ref.prompt_token_ids}: step {step} chose {a} (logprob "
                f"{choice.logprob:.4f}) vs {b}; reference top {choice.top[:4]}; "
                f"reference {ref.token_ids}, other {out.token_ids}"
            )
            assert b in alternatives and choice.logprob - alternatives[b] < gap, detail
            print("near-tie:", detail)
            break
        else:
            assert len(ref.token_ids) == len(out.token_ids)
    return equal


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("fused", "kv_cache_dtype"),
    [(True, "auto"), (False, "auto"), (True, "fp8_e4m3")],
    ids=["fused-kernels", "unfused", "fp8-kv"],
)
def test_gpu_greedy_generation_equals_the_triton_backend(tmp_path, fused, kv_cache_dtype):
    """End to end in bf16 with CUDA graphs: prefill, chunked prefill, prefix-cache hits
    (extend over cached pages) and decode steps; equal to the triton backend's tokens up to
    near-ties. `fp8-kv`: both backends over an FP8 KV cache (the same e4m3 bytes, each
    backend's own kernels reading them)."""
    from fixtures import build_tiny_model
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    model = build_tiny_model(tmp_path / "qwen3-hd128", "qwen3", head_dim=128)
    shared = list(range(40, 80))
    rounds = [  # the second round hits the first one's cached pages (extend over a prefix)
        [[5, 9, 13, 2, 7], [11] * 23, shared + [3, 8]],
        [shared + [90, 91, 92], shared[:33] + [7]],
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5)
    outs = {}
    for attention in ("triton", "flashinfer"):
        with LLM(
            str(model), attention=attention, dtype="bfloat16", page_size=16,
            max_num_batched_tokens=32, kv_cache_tokens=4096, kv_cache="radix",
            disable_fused_kernels=not fused, kv_cache_dtype=kv_cache_dtype, **GPU_ENGINE,
        ) as llm:  # fmt: skip
            assert llm.engine.kv.pool.is_fp8 == (kv_cache_dtype == "fp8_e4m3")
            outs[attention] = [o for prompts in rounds for o in llm.generate(prompts, params)]
            if attention == "flashinfer":
                assert llm.engine.kv.stats()["prefix_hit_tokens"] >= 32
                runner = llm.engine.runner
                assert runner.cuda_graphs is not None and runner.cuda_graphs.num_replays > 0
    # FP8: each backend stores the K/V its own prefill computed, and an e4m3 step is 1/8 of the
    # value, so a bf16-rounding difference can become a whole e4m3 step: a wider near-tie
    # (the H200 showed a 0.19-nat tie part them, session 14)
    gap = 0.3 if kv_cache_dtype == "fp8_e4m3" else 0.1
    equal = assert_greedy_agrees_up_to_near_ties(outs["triton"], outs["flashinfer"], gap)
    print(f"{equal} of {sum(len(o.token_ids) for o in outs['triton'])} tokens equal")
    assert equal >= 20  # near-ties are rare: most tokens are compared
