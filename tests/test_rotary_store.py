"""Rope and the KV store in one kernel (`core/kernels/rotary_store.py`,
`PEGBOARD_FUSED_ROPE_STORE`): bit for bit `rotary.rotary_embedding` followed by the `triton`
backend's `store_kv` (q and k in place, the pool's pages, FP8 pools, padding slots), and the
decoder with the switch on gives the logits of the switch off without the separate store.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes (both sides in the
interpreter, so its FP8 conversion is the same on both); the `gpu` tests run Llama-3.1-8B and
Qwen3 shapes in bf16 and a graph-captured decode.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures import PageAllocator  # noqa: E402
from pegboard.core.kernels.rotary import rotary_embedding  # noqa: E402
from pegboard.core.kernels.rotary_store import rotary_store_kv  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.plugins.kernels import triton_attention  # noqa: E402
from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend  # noqa: E402
from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend  # noqa: E402
from pegboard.plugins.kernels.triton_attention.store_kv import store_kv  # noqa: E402
from pegboard.sdk.types import KVPool, Request  # noqa: E402
from test_fused_kernels import DEVICE, make_norm, make_rope, positions, qkv_views  # noqa: E402

FP8 = torch.float8_e4m3fn


def pools(num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
          values_transposed: bool = False):  # fmt: skip
    """Two identical pairs of (k, v) caches filled with a pattern (to see what is written);
    `values_transposed`: values stored `[Hkv, D, page_size]` per page (`KVPool.v_layout ==
    "hdp"`), the value cache a strided view of them."""
    shape = (num_pages, page_size, kv_heads, head_dim)
    fill = torch.linspace(-3, 3, num_pages * page_size * kv_heads * head_dim).view(shape)
    k = fill.to(DEVICE).to(dtype)
    v = fill.flip(0).to(DEVICE).to(dtype)

    def values():
        if not values_transposed:
            return v.clone()
        return v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)

    return (k.clone(), values()), (k.clone(), values())


def both_ways(tokens, heads, kv_heads, head_dim, slots, cache_dtype, dtype=torch.float32,
              scales=(1.0, 1.0), norm=False, num_pages=4, page_size=4,
              values_transposed=False):  # fmt: skip
    """(fused, separate): each `(q, k, v, k_cache, v_cache)` after rope + store."""
    rotary = make_rope(head_dim, max_len=4096)
    pos = positions(tokens, 4096)
    slots = torch.tensor(slots, device=DEVICE)
    weights = ()
    if norm:
        weights = (make_norm(head_dim, dtype).weight, make_norm(head_dim, dtype).weight * 0.5)
    fused_caches, separate_caches = pools(
        num_pages, page_size, kv_heads, head_dim, cache_dtype, values_transposed
    )
    out = []
    for fused, (k_cache, v_cache) in ((True, fused_caches), (False, separate_caches)):
        _, q, k, v = qkv_views(tokens, heads, kv_heads, head_dim, dtype)
        if fused:
            rotary_store_kv(pos, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, slots,
                            *scales, *weights)  # fmt: skip
        else:
            rotary_embedding(pos, q, k, rotary.cos, rotary.sin, *weights)
            store_kv(k, v, k_cache, v_cache, slots, *scales)
        out.append((q, k, v, k_cache, v_cache))
    return out


def assert_same(fused, separate):
    for a, b in zip(fused, separate):
        if a.dtype == FP8:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------ kernel, CPU interpreter


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(4, 2, 16), (3, 1, 24)], ids=["gqa2", "half-12"]
)
def test_rotary_store_equals_rope_then_store_kv_bit_for_bit(heads, kv_heads, head_dim):
    # slots over several pages, out of order, one padding row (-1) that stores nothing
    fused, separate = both_ways(5, heads, kv_heads, head_dim, [13, 2, -1, 7, 0], torch.float32)
    assert_same(fused, separate)
    q, k, v, k_cache, v_cache = fused
    torch.testing.assert_close(k_cache.view(-1, kv_heads, head_dim)[13], k[0], atol=0, rtol=0)
    torch.testing.assert_close(v_cache.view(-1, kv_heads, head_dim)[0], v[4], atol=0, rtol=0)
    untouched, _ = pools(4, 4, kv_heads, head_dim, torch.float32)[0]
    written = torch.zeros(16, dtype=torch.bool)
    written[[13, 2, 7, 0]] = True
    torch.testing.assert_close(k_cache.view(16, -1)[~written], untouched.view(16, -1)[~written])


def test_rotary_store_with_qk_norm_equals_the_separate_kernels():
    assert_same(*both_ways(3, 4, 2, 32, [5, 6, 1], torch.float32, norm=True))


def test_rotary_store_into_an_fp8_pool_with_scales_equals_store_kv():
    fused, separate = both_ways(3, 4, 2, 16, [3, -1, 9], FP8, torch.bfloat16, scales=(2.0, 0.5))
    assert_same(fused, separate)
    assert fused[3].view(torch.uint8).view(16, -1)[3].any()  # something was stored


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
def test_rotary_store_into_values_transposed_per_page_equals_store_kv(cache_dtype):
    """A pool whose values are stored `[Hkv, D, page_size]` per page (`KVPool.v_layout ==
    "hdp"`, read by the `fp8_mma` decode kernel): the value cache is a strided view, and the
    fused kernel writes what `store_kv` writes, where the view says."""
    slots = [3, 9, 14]
    fused, separate = both_ways(3, 4, 2, 16, slots, cache_dtype, torch.bfloat16,
                                values_transposed=True)  # fmt: skip
    v_cache = fused[4]
    assert v_cache.stride(1) == 1 and v_cache.stride(3) == 4
    assert_same(fused, separate)
    if cache_dtype != FP8:  # (the interpreter's own e4m3 rounding differs from torch's)
        values = v_cache.contiguous().view(-1, 2, 16)[slots]  # the logical [page, offset] rows
        torch.testing.assert_close(values, fused[2].float(), atol=0, rtol=0)


def test_rotary_store_rejects_a_pool_of_other_heads():
    rotary = make_rope(16)
    _, q, k, v = qkv_views(2, 4, 2, 16)
    k_cache = torch.zeros(4, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not hold 2 KV heads of 16"):
        rotary_store_kv(positions(2), q, k, v, rotary.cos, rotary.sin, k_cache, k_cache,
                        torch.tensor([0, 1], device=DEVICE))  # fmt: skip


# ------------------------------------------------------------------ the decoder


@pytest.fixture
def store_calls(monkeypatch):
    """Tokens of each call of the `triton` backend's separate store kernel."""
    calls: list[int] = []

    def spy(k, v, *args):
        calls.append(k.shape[0])
        return store_kv(k, v, *args)

    monkeypatch.setattr(triton_attention, "store_kv", spy)
    return calls


def step_logits(runner: ModelRunner, backend_cls) -> list[torch.Tensor]:
    """Logits of a prefill of two prompts, then two decode steps, on a fresh pool."""
    pool = KVPool.allocate(runner.info, 16, 4)
    alloc = PageAllocator(16, 4)
    runner.set_attention(backend_cls(runner.info, pool))
    requests = [Request(prompt_token_ids=p) for p in ([5, 9, 200, 17, 33], [300, 2, 77])]
    plan, out = [r.num_tokens for r in requests], []
    for step in range(3):
        for r, n in zip(requests, plan):
            alloc.grow(r, n)
        out.append(runner.forward(runner.prepare(requests, plan, 4)))
        for r, n in zip(requests, plan):
            r.num_computed_tokens += n
            r.append_token(11 + step)
        plan = [1, 1]
    return out


def test_decoder_with_fused_rope_store_equals_it_without(tiny_llama_dir, store_calls, monkeypatch):
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    model, layers = runner.model, runner.model.config.num_layers
    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "0")
    model.set_fused_kernels(True)
    expected = step_logits(runner, TritonAttentionBackend)
    assert store_calls == [8] * layers + [2] * 2 * layers
    store_calls.clear()
    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "1")
    model.set_fused_kernels(True)
    got = step_logits(runner, TritonAttentionBackend)
    assert store_calls == []  # the rope kernel stored every layer's K/V
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a backend without a fused store (torch) still gets K/V through `forward`
    reference = step_logits(runner, TorchAttentionBackend)
    for a, b in zip(reference, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_switch_is_on_by_default_and_read_when_kernels_switch_on(tiny_llama_dir, monkeypatch):
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    attention = runner.model.model.layers[0].self_attn
    monkeypatch.delenv("PEGBOARD_FUSED_ROPE_STORE", raising=False)
    runner.model.set_fused_kernels(True)
    assert attention.fused_store
    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "0")
    assert attention.fused_store  # read when the kernels are switched on
    runner.model.set_fused_kernels(True)
    assert not attention.fused_store
    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "1")
    runner.model.set_fused_kernels(True)
    assert attention.fused_store
    runner.model.set_fused_kernels(False)
    assert not attention.fused_store


def test_kit_checks_a_backend_that_offers_the_fused_store():
    from pegboard.plugins.kernels.attention_torch import TorchAttention
    from pegboard.sdk import testing

    class Offering(TorchAttentionBackend):
        """Offers the fused store: wrong slots, or an `attend` that is not `forward`'s."""

        supports_fused_kv_store = True
        wrong_slots = False

        def kv_store_target(self, layer):
            slots = self.batch.slot_mapping
            slots = slots.flip(0) if self.wrong_slots else slots
            return self.pool.k[layer], self.pool.v[layer], slots, 1.0, 1.0

        def attend(self, layer, q):
            return torch.zeros_like(q)

    def plugin(backend_cls):
        class Plugin(TorchAttention):
            name = "offering"

            def attention_kernel(self, model, pool):
                return backend_cls(model, pool)

        return Plugin

    with pytest.raises(testing.ConformanceError, match="attend.layer, q. over the K/V"):
        testing.check_attention(plugin(Offering))

    class WrongSlots(Offering):
        wrong_slots = True

    with pytest.raises(testing.ConformanceError, match="kv_store_target.layer. returns"):
        testing.check_attention(plugin(WrongSlots))


# ------------------------------------------------------------------ GPU, bf16, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 200])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "norm"), [(32, 8, False), (16, 8, True)], ids=["llama-8b", "qwen3"]
)
def test_gpu_rotary_store_at_real_shapes_bit_for_bit(heads, kv_heads, norm, tokens, cache):
    gen = torch.Generator().manual_seed(tokens)
    slots = torch.randperm(64 * 16, generator=gen)[:tokens].tolist()
    slots[-1] = -1  # a padding row
    dtype, scales = (FP8, (2.0, 0.5)) if cache == "fp8" else (torch.bfloat16, (1.0, 1.0))
    fused, separate = both_ways(tokens, heads, kv_heads, 128, slots, dtype, torch.bfloat16,
                                scales, norm, num_pages=64, page_size=16)  # fmt: skip
    assert_same(fused, separate)


@pytest.mark.gpu
def test_gpu_rotary_store_is_captured_and_replays_new_slots():
    rotary = make_rope(128, max_len=4096)
    (k_cache, v_cache), _ = pools(8, 16, 8, 128, torch.bfloat16)
    qkv, q, k, v = qkv_views(1, 32, 8, 128, torch.bfloat16)
    pos = torch.tensor([5], device=DEVICE)
    slots = torch.tensor([3], device=DEVICE)
    rotary_store_kv(pos, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, slots)  # compile
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            rotary_store_kv(pos, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fresh = qkv_views(1, 32, 8, 128, torch.bfloat16)[0]
    qkv.copy_(fresh.mul(2))
    pos.fill_(900)
    slots.fill_(77)
    graph.replay()
    _, eq, ek, ev = qkv_views(1, 32, 8, 128, torch.bfloat16)
    eq.mul_(2), ek.mul_(2), ev.mul_(2)
    rotary_embedding(pos, eq, ek, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, eq, atol=0, rtol=0)
    torch.testing.assert_close(k_cache.view(-1, 8, 128)[77], ek[0], atol=0, rtol=0)
    torch.testing.assert_close(v_cache.view(-1, 8, 128)[77], ev[0], atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_graph_decode_with_fused_rope_store_equals_unfused(
    tiny_llama_dir, store_calls, monkeypatch, dtype="bfloat16"
):
    """Greedy tokens of a CUDA-graph decode (3 requests, then fewer) with the switch on equal
    those with it off, and the separate store kernel ran in neither graphs nor prefill."""
    from test_cuda_graph import _generate, _prompts

    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "0")
    unfused, _, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype=dtype)
    assert store_calls
    store_calls.clear()
    monkeypatch.setenv("PEGBOARD_FUSED_ROPE_STORE", "1")
    fused, graphs, runner = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype=dtype)
    assert runner.cuda_graphs is not None and graphs[0].num_replays >= 15
    assert fused == unfused
    assert store_calls == []
