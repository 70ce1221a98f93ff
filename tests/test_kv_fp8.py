"""FP8 KV cache (`--kv-cache-dtype fp8_e4m3`): pools hold one byte per value (sizing counts
it), the torch backend computes attention over the FP8-rounded keys and values with per-layer
scales, the paged/radix/hicache caches serve with it, and an attention backend that cannot read
it is refused before serving. The Triton backend's FP8 path runs in Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before Triton is imported) at toy sizes, and on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from fixtures.interpreter_fp8 import exact_e4m3_in_interpreter
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.kernels.attention_torch import TorchAttention, TorchAttentionBackend
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, SamplingParams, kv_dtype

FP8 = torch.float8_e4m3fn
PROMPTS = [[5, 9, 30, 41, 7], [100, 3, 64, 12, 12, 90, 17]]


def info(dtype=torch.float32, device="cpu") -> ModelInfo:
    return ModelInfo("LlamaForCausalLM", 2, 4, 2, 16, 64, 512, 256, dtype, torch.device(device))


def test_kv_cache_dtype_names():
    assert kv_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_dtype("fp8_e4m3", torch.bfloat16) is FP8
    with pytest.raises(ValueError, match="'int4' is not supported"):
        kv_dtype("int4", torch.bfloat16)


def test_fp8_pool_counts_one_byte_per_value():
    m = info(torch.bfloat16)
    assert KVPool.bytes_per_token(m, FP8) * 2 == KVPool.bytes_per_token(m)
    pool = KVPool.allocate(m, 4, 16, dtype=FP8)
    assert pool.is_fp8 and pool.k[0].dtype is FP8 and pool.k_scale(1) == 1.0


def _batch(q_lens, seq_lens, pages, page_size, device="cpu") -> ForwardBatch:
    slots = []
    for q_len, seq_len, table in zip(q_lens, seq_lens, pages):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // page_size] * page_size + pos % page_size)
    n = sum(q_lens)
    return ForwardBatch(
        requests=[],
        input_ids=torch.zeros(n, dtype=torch.long, device=device),
        positions=torch.zeros(n, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
        page_tables_cpu=pages,
        logits_indices=torch.zeros(len(q_lens), dtype=torch.long, device=device),
    )


def _attend(pool: KVPool, m: ModelInfo, q, k, v, batch, backend_cls=TorchAttentionBackend):
    backend = backend_cls(m, pool)
    backend.prepare(batch)
    return backend.forward(0, q, k, v)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_torch_backend_attends_over_the_fp8_rounded_keys_and_values(scale):
    m = info()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, 16, generator=gen)
    k = torch.randn(9, 2, 16, generator=gen) * 3
    v = torch.randn(9, 2, 16, generator=gen)
    batch = _batch([5, 4], [5, 4], [[0], [1]], 16)
    fp8 = KVPool.allocate(m, 4, 16, dtype=FP8)
    fp8.k_scales, fp8.v_scales = [scale] * 2, [scale] * 2
    got = _attend(fp8, m, q, k, v, batch)
    # The oracle: float32 attention over the values an FP8 pool with this scale holds.
    rk = (k / scale).to(FP8).float() * scale
    rv = (v / scale).to(FP8).float() * scale
    expected = _attend(KVPool.allocate(m, 4, 16), m, q, rk, rv, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    exact = _attend(KVPool.allocate(m, 4, 16), m, q, k, v, batch)
    assert (got - exact).abs().max() > 0  # it really went through 8 bits


def test_per_layer_scales_keep_large_values_that_would_saturate():
    m = info()
    gen = torch.Generator().manual_seed(0)  # (unseeded, it failed now and then)
    q = torch.randn(3, 4, 16, generator=gen)
    k = torch.randn(3, 2, 16, generator=gen) * 2000  # beyond e4m3's 448
    v = torch.randn(3, 2, 16, generator=gen) * 2000
    batch = _batch([3], [3], [[0]], 16)
    exact = _attend(KVPool.allocate(m, 2, 16), m, q, k, v, batch)
    unscaled = _attend(KVPool.allocate(m, 2, 16, dtype=FP8), m, q, k, v, batch)
    scaled_pool = KVPool.allocate(m, 2, 16, dtype=FP8)
    scaled_pool.k_scales = scaled_pool.v_scales = [16.0, 16.0]
    scaled = _attend(scaled_pool, m, q, k, v, batch)
    assert torch.isfinite(unscaled).all()  # saturated, not NaN
    err_scaled = (scaled - exact).norm() / exact.norm()
    err_unscaled = (unscaled - exact).norm() / exact.norm()
    assert err_scaled < 0.1 < err_unscaled


@pytest.mark.parametrize("cache", ["paged", "radix", "hicache"])
def test_caches_serve_with_an_fp8_pool_of_twice_the_pages(tiny_llama_dir, cache):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    common = {"dtype": "bfloat16", "device": "cpu", "kv_cache": cache}
    plain = LLM(str(tiny_llama_dir), **common)
    fp8 = LLM(str(tiny_llama_dir), kv_cache_dtype="fp8_e4m3", **common)
    assert fp8.engine.kv.pool.dtype is FP8
    assert fp8.engine.kv.num_pages == 2 * plain.engine.kv.num_pages  # same bytes, half per token
    expected = [o.token_ids for o in plain.generate(PROMPTS, params)]
    got = [o.token_ids for o in fp8.generate(PROMPTS, params)]
    # A tiny random model is chaotic; the first tokens agree, every request completes.
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert all(len(g) == 6 for g in got)


class PlainBackend(TorchAttentionBackend):
    supports_fp8_kv = False


class PlainAttention(TorchAttention):
    """An attention plugin whose backend cannot read FP8 (as a third-party one may not)."""

    name = "plain"

    def attention_kernel(self, model, pool):
        return PlainBackend(model, pool)


def test_attention_backend_without_fp8_support_is_refused_before_serving(tiny_llama_dir):
    manager = PluginManager()
    manager.add(PlainAttention, name="plain")
    with pytest.raises(ValueError, match="attention plugin 'plain' does not read an FP8 KV"):
        LLM(str(tiny_llama_dir), plugins=manager, device="cpu", attention="plain",
            kv_cache_dtype="fp8_e4m3")  # fmt: skip


def test_calibrated_scales_file_sets_the_pool_scales(tiny_llama_dir, tmp_path):
    import json

    path = tmp_path / "scales.json"
    path.write_text(json.dumps({"k_scales": [0.05, 0.07], "v_scales": [0.01, 0.02]}))
    llm = LLM(str(tiny_llama_dir), device="cpu", kv_cache_dtype="fp8_e4m3",
              kv_cache_scales=str(path))  # fmt: skip
    pool = llm.engine.kv.pool
    assert pool.k_scales == [0.05, 0.07] and pool.v_scales == [0.01, 0.02]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([PROMPTS[0]], params)[0].token_ids) == 3


@pytest.mark.parametrize(
    ("content", "fp8", "message"),
    [
        ({"k_scales": [1.0], "v_scales": [1.0, 1.0]}, True, "'k_scales' must list one scale"),
        ({"k_scales": [1.0, -2.0], "v_scales": [1.0, 1.0]}, True, r"k_scales\[1\] is not a pos"),
        ("not json", True, "cannot read it"),
        ({"k_scales": [1.0, 1.0], "v_scales": [1.0, 1.0]}, False, "needs --kv-cache-dtype fp8"),
    ],
    ids=["layers", "negative", "unreadable", "not-fp8"],
)
def test_bad_kv_scales_file_is_refused_before_serving(tiny_llama_dir, tmp_path, content, fp8,
                                                      message):  # fmt: skip
    import json

    path = tmp_path / "scales.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_llama_dir), device="cpu", kv_cache_dtype="fp8_e4m3" if fp8 else "auto",
            kv_cache_scales=str(path))  # fmt: skip


def test_unknown_kv_cache_dtype_is_refused(tiny_llama_dir):
    with pytest.raises(Exception, match="kv cache dtype 'int2' is not supported"):
        LLM(str(tiny_llama_dir), device="cpu", kv_cache_dtype="int2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "decode",
    [False, True, "fma"],  # (fma: the opt-in CUDA-core FP8 decode, PEGBOARD_FP8_DECODE=fma)
)
@pytest.mark.parametrize("layout", ["nhd", "hdp"])
def test_triton_backend_reads_fp8_like_the_torch_backend(decode, layout, monkeypatch):
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend
    from pegboard.plugins.kernels.triton_attention import decode as decode_module

    monkeypatch.setattr(decode_module, "FP8_DECODE", "fma" if decode == "fma" else "dot")

    m = ModelInfo("LlamaForCausalLM", 1, 32, 8, 128, 4096, 512, 4096, torch.bfloat16,
                  torch.device("cuda"))  # fmt: skip
    gen = torch.Generator("cuda").manual_seed(0)
    pages = [[0, 1, 2, 3], [4, 5, 6, 7]]
    seq_lens = [50, 37]
    q_lens = [1, 1] if decode else seq_lens
    n = sum(q_lens)
    q = torch.randn(n, 32, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(n, 8, 128, generator=gen, device="cuda").bfloat16()
    v = torch.randn(n, 8, 128, generator=gen, device="cuda").bfloat16()
    outs = []
    for cls in (TorchAttentionBackend, TritonAttentionBackend):
        pool = KVPool.allocate(m, 8, 16, dtype=FP8, v_layout=layout)
        pool.k_scales, pool.v_scales = [2.0], [0.5]
        if decode:  # fill the prefix through a prefill first
            pre = _batch([s - 1 for s in seq_lens], [s - 1 for s in seq_lens], pages, 16, "cuda")
            backend = cls(m, pool)
            backend.prepare(pre)
            pk = torch.randn(
                sum(seq_lens) - 2,
                8,
                128,
                generator=torch.Generator("cuda").manual_seed(1),
                device="cuda",
            ).bfloat16()  # noqa: E501
            backend.forward(0, torch.zeros(pk.shape[0], 32, 128, device="cuda").bfloat16(), pk, pk)
        backend = cls(m, pool)
        backend.prepare(_batch(q_lens, seq_lens, pages, 16, "cuda"))
        outs.append(backend.forward(0, q, k, v).float())
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    # hdp decodes with e4m3 queries and probabilities (decode_fp8mma.py): 2.3e-2 on CPU
    assert rel < (4e-2 if layout == "hdp" and decode else 2e-2), f"relative error {rel:.2e}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test above covers the device")
@pytest.mark.parametrize("mode", ["prefill", "decode", "decode-fma", "prefill-hdp", "decode-hdp"])
def test_triton_kernels_read_fp8_like_the_torch_backend_in_the_interpreter(mode, monkeypatch):
    # The decode and extend kernels reading e4m3 through float16 dots, and the decode kernel's
    # CUDA-core variant (the interpreter's bf16 tl.dot is broken, so the bf16 path is left to
    # the GPU test).
    pytest.importorskip("triton")
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend
    from pegboard.plugins.kernels.triton_attention import decode as decode_module

    monkeypatch.setattr(decode_module, "FP8_DECODE", "fma" if mode == "decode-fma" else "dot")
    monkeypatch.setattr(decode_module, "FP8_F16_DOT", True)  # opt-in on the GPU (see there)
    hdp = mode.endswith("-hdp")  # values transposed per page: the e4m3 tensor-core decode
    exact_e4m3_in_interpreter(monkeypatch)  # for store_kv, and hdp's quantized query and P
    mode = mode.removesuffix("-hdp")
    decode = mode != "prefill"
    m = info(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    pages, seq_lens = [[0, 1], [2, 3]], [20, 29]
    q_lens = [1, 1] if decode else seq_lens
    n = sum(q_lens)
    q, k, v = (torch.randn(n, h, 16, generator=gen).bfloat16() for h in (4, 2, 2))
    prefix = torch.randn(sum(seq_lens) - 2, 2, 16, generator=gen).bfloat16()
    outs = []
    for cls in (TorchAttentionBackend, TritonAttentionBackend):
        pool = KVPool.allocate(m, 4, 16, dtype=FP8, v_layout="hdp" if hdp else "nhd")
        pool.k_scales, pool.v_scales = [2.0, 2.0], [0.5, 0.5]
        if decode:  # the prefix's keys and values stored by a prefill first
            pre = _batch([s - 1 for s in seq_lens], [s - 1 for s in seq_lens], pages, 16)
            _attend(pool, m, torch.zeros(len(prefix), 4, 16).bfloat16(), prefix, prefix, pre, cls)
        outs.append(_attend(pool, m, q, k, v, _batch(q_lens, seq_lens, pages, 16), cls).float())
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    # e4m3 queries and probabilities in the hdp decode: 2.3e-2 (float16 dots: 4e-3)
    assert rel < (4e-2 if hdp and decode else 1e-2), f"relative error {rel:.2e}"


def test_checkpoint_kv_scales_become_the_fp8_pool_scales(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_llama_dir, model_dir)
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    state["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    state["model.layers.1.self_attn.kv_scale"] = torch.tensor([2.0])
    save_file(state, str(model_dir / "model.safetensors"))
    fp8 = LLM(str(model_dir), device="cpu", kv_cache_dtype="fp8_e4m3")
    assert fp8.engine.kv.pool.k_scales == [0.5, 2.0]
    assert fp8.engine.kv.pool.v_scales == [0.25, 2.0]
    plain = LLM(str(model_dir), device="cpu")  # the same checkpoint, model-dtype KV
    assert plain.engine.kv.pool.k_scales == []
