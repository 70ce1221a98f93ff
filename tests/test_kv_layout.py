"""`--kv-cache-layout hdp`: an FP8 pool stores each page's values transposed
(`[kv_heads, head_dim, page_size]`, `KVPool.v_layout`) for the e4m3 tensor-core decode kernel.
Every reader and writer indexes values through the pool's layout or is refused before serving:
the engine gives the same greedy tokens either way (the torch backend computes the same
numbers; the Triton backend in the CPU interpreter runs `store_kv`, the extend kernel and the
e4m3 decode kernel over it), host-tier page copies and PD pool layouts keep the layout, and
wrong combinations fail with a clear error."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from fixtures.interpreter_fp8 import exact_e4m3_in_interpreter
from pegboard.core.config import EngineConfig
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.cache.hicache import _copy_pages, _host_pool
from pegboard.plugins.kernels.attention_torch import TorchAttention, TorchAttentionBackend
from pegboard.sdk.transfer import PoolLayout
from pegboard.sdk.types import KVPool, ModelInfo, SamplingParams

FP8 = torch.float8_e4m3fn
PROMPTS = [[5, 9, 30, 41, 7], [100, 3, 64, 12, 12, 90, 17, 8, 8, 2, 61, 19, 4, 77, 31, 6, 50]]
INFO = ModelInfo("LlamaForCausalLM", 2, 4, 2, 16, 64, 512, 256, torch.float32, torch.device("cpu"))


def random_pool(layout: str, num_pages: int = 6, page_size: int = 4) -> KVPool:
    pool = KVPool.allocate(INFO, num_pages, page_size, dtype=FP8, v_layout=layout)
    gen = torch.Generator().manual_seed(0)
    for t in pool.k + pool.v:  # (CPU has no FP8 fill ops: write through bytes)
        t.view(torch.uint8).copy_(torch.randint(0, 0x7E, t.shape, generator=gen))
    return pool


def test_an_hdp_pool_stores_each_page_of_values_transposed_and_contiguous():
    pool = random_pool("hdp")
    v = pool.v[0]
    assert v.shape == pool.k[0].shape == (6, 4, 2, 16)  # the same logical shape as the keys
    assert v.stride() == (2 * 16 * 4, 1, 16 * 4, 4)  # tokens contiguous, one page one block
    stored = pool.stored_values()[0]
    assert stored.is_contiguous() and stored.data_ptr() == v.data_ptr()
    assert torch.equal(stored.permute(0, 3, 1, 2).view(torch.uint8), v.view(torch.uint8))


def test_hdp_needs_an_fp8_pool_and_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="needs --kv-cache-dtype fp8_e4m3"):
        KVPool.allocate(INFO, 2, 4, v_layout="hdp")
    with pytest.raises(ValueError, match="layout 'hnd' is not supported"):
        KVPool.allocate(INFO, 2, 4, dtype=FP8, v_layout="hnd")
    with pytest.raises(ValueError, match="needs --kv-cache-dtype fp8_e4m3"):
        EngineConfig(kv_cache_layout="hdp")
    with pytest.raises(ValueError, match="cannot serve with --speculator ngram"):
        EngineConfig(kv_cache_layout="hdp", kv_cache_dtype="fp8_e4m3", speculator="ngram")


def test_auto_layout_is_hdp_only_for_fp8_served_by_triton_on_cuda_without_speculation():
    fp8 = EngineConfig(kv_cache_dtype="fp8_e4m3")
    assert fp8.value_layout(on_cuda=True, attention="triton") == "hdp"
    assert fp8.value_layout(on_cuda=False, attention="torch") == "nhd"
    assert fp8.value_layout(on_cuda=False, attention="triton") == "nhd"
    assert fp8.value_layout(on_cuda=True, attention="flashinfer") == "nhd"
    spec = EngineConfig(kv_cache_dtype="fp8_e4m3", speculator="ngram")
    assert spec.value_layout(on_cuda=True, attention="triton") == "nhd"
    assert EngineConfig().value_layout(on_cuda=True, attention="triton") == "nhd"
    named = EngineConfig(kv_cache_dtype="fp8_e4m3", kv_cache_layout="nhd")
    assert named.value_layout(on_cuda=True, attention="triton") == "nhd"


def test_host_tier_copies_keep_the_layout_and_the_values():
    device = random_pool("hdp")
    host = _host_pool(device, 4)
    assert host.v_layout == "hdp" and host.v[0].stride() == device.v[0].stride()
    _copy_pages(device, [2, 0], host, [1, 3])
    back = random_pool("hdp")
    _copy_pages(host, [1, 3], back, [4, 5])
    for src, dst in zip(device.k + device.v, back.k + back.v):
        assert torch.equal(dst.view(torch.uint8)[[4, 5]], src.view(torch.uint8)[[2, 0]])


def test_pd_pool_layouts_carry_the_value_layout_and_refuse_a_mismatch():
    hdp, nhd = PoolLayout.of(random_pool("hdp")), PoolLayout.of(random_pool("nhd"))
    assert hdp.page_bytes == nhd.page_bytes  # a page is one block of bytes either way
    assert PoolLayout.from_json(hdp.to_json()) == hdp
    assert "values stored 'nhd' vs 'hdp'" in hdp.mismatch(nhd)
    assert hdp.mismatch(PoolLayout.from_json(hdp.to_json())) is None


def test_pd_byte_runs_move_hdp_pages_with_their_values():
    """What a transfer backend does with `byte_runs` (copy each run's bytes), done here with
    memmove: the destination's pages hold the source's keys and values, values transposed."""
    import ctypes

    from pegboard.sdk.transfer import byte_runs

    src, dst = random_pool("hdp"), KVPool.allocate(INFO, 6, 4, dtype=FP8, v_layout="hdp")
    for run in byte_runs(PoolLayout.of(src), PoolLayout.of(dst), [4, 5, 1], [0, 1, 3]):
        ctypes.memmove(run.dst, run.src, run.nbytes)
    for s, d in zip(src.k + src.v, dst.k + dst.v):
        assert torch.equal(d.view(torch.uint8)[[0, 1, 3]], s.view(torch.uint8)[[4, 5, 1]])


def generate(model_dir, layout, max_tokens=10, **kw):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_dtype="fp8_e4m3",
              kv_cache_layout=layout, **kw)  # fmt: skip
    assert llm.engine.kv.pool.v_layout == ("hdp" if layout == "hdp" else "nhd")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("cache", ["paged", "radix", "hicache"])
def test_the_torch_backend_gives_the_same_greedy_tokens_over_hdp_values(tiny_llama_dir, cache):
    """The same stored bytes read through the layout: the same numbers, the same tokens."""
    nhd = generate(tiny_llama_dir, "auto", attention="torch", kv_cache=cache)
    hdp = generate(tiny_llama_dir, "hdp", attention="torch", kv_cache=cache)
    assert hdp == nhd


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run, CPU only")
def test_the_triton_backend_over_hdp_values_follows_the_torch_backend(tiny_llama_dir, monkeypatch):
    """Triton in the CPU interpreter: `store_kv` and the extend kernel through the value
    strides, decode steps in the e4m3 tensor-core kernel (the query and probabilities in
    e4m3: the tiny random model is chaotic, so the first tokens agree and all complete)."""
    pytest.importorskip("triton")
    from pegboard.plugins.kernels.triton_attention import decode

    exact_e4m3_in_interpreter(monkeypatch)
    launches = []
    kernel = decode.decode_fp8mma
    monkeypatch.setattr(decode, "decode_fp8mma", lambda *a: launches.append(1) or kernel(*a))
    reference = generate(tiny_llama_dir, "hdp", max_tokens=6, attention="torch")
    got = generate(tiny_llama_dir, "hdp", max_tokens=6, attention="triton",
                   disable_cuda_graph=True)  # fmt: skip
    assert [g[:3] for g in got] == [r[:3] for r in reference]
    assert all(len(g) == 6 for g in got)
    assert len(launches) >= 5 * INFO.num_layers  # every decode step, every layer


class NhdOnlyBackend(TorchAttentionBackend):
    v_layouts = ("nhd",)


class NhdOnlyAttention(TorchAttention):
    """An attention plugin that reads FP8 but only NHD values (as a third-party one may)."""

    name = "nhd-only"

    def attention_kernel(self, model, pool):
        return NhdOnlyBackend(model, pool)


def test_an_attention_backend_that_cannot_read_hdp_is_refused_before_serving(tiny_llama_dir):
    manager = PluginManager()
    manager.add(NhdOnlyAttention, name="nhd-only")
    with pytest.raises(ValueError, match="'nhd-only' does not read values stored 'hdp'"):
        LLM(str(tiny_llama_dir), plugins=manager, device="cpu", attention="nhd-only",
            kv_cache_dtype="fp8_e4m3", kv_cache_layout="hdp")  # fmt: skip
