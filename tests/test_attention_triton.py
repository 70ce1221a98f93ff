"""The `triton` attention backend against the reference torch backend.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported), so these shapes stay tiny; the `gpu` tests run realistic shapes compiled.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.plugins.kernels import triton_attention  # noqa: E402
from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend  # noqa: E402
from pegboard.plugins.kernels.attention_triton import (  # noqa: E402
    TritonAttention,
    TritonAttentionBackend,
)
from pegboard.sdk.slots import AttentionBackend, PluginContext  # noqa: E402
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Case:
    """A step's inputs: a pool holding every request's cached prefix, the batch, and the new
    tokens' q/k/v."""

    info: ModelInfo
    pool: KVPool
    batch: ForwardBatch
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_case(
    cached: list[int],
    new: list[int],
    page_size: int,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: int = 2,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-(c + n) // page_size) for c, n in zip(cached, new)) + 3
    info = ModelInfo("Test", layers, heads, kv_heads, head_dim, 32, 100, 4096, dtype, DEVICE)
    pool = KVPool.allocate(info, num_pages, page_size)
    for t in pool.k + pool.v:  # cached prefixes (and stale data everywhere else)
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    free = torch.randperm(num_pages, generator=gen).tolist()  # scattered pages
    tables, slots, positions = [], [], []
    for c, n in zip(cached, new):
        table = [free.pop() for _ in range(-(-(c + n) // page_size))]
        tables.append(table)
        positions += range(c, c + n)
        slots += [table[p // page_size] * page_size + p % page_size for p in range(c, c + n)]
    tokens = sum(new)
    batch = ForwardBatch(
        requests=[Request(prompt_token_ids=[1] * (c + n)) for c, n in zip(cached, new)],
        input_ids=torch.zeros(tokens, dtype=torch.int64, device=DEVICE),
        positions=torch.tensor(positions, dtype=torch.int64, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_lens_cpu=list(new),
        seq_lens_cpu=[c + n for c, n in zip(cached, new)],
        page_tables_cpu=tables,
        logits_indices=torch.tensor(new, device=DEVICE).cumsum(0) - 1,
        samples=[True] * len(new),
    )

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q = rand(tokens, heads, head_dim)
    return Case(
        info, pool, batch, q, rand(tokens, kv_heads, head_dim), rand(tokens, kv_heads, head_dim)
    )


def run(backend_cls: type[AttentionBackend], case: Case, layer: int = 1, **kw):
    """The backend's output on its own copy of the pool; returns (output, pool)."""
    pool = copy.deepcopy(case.pool)
    backend = backend_cls(case.info, pool, **kw)
    backend.prepare(case.batch)
    return backend.forward(layer, case.q, case.k, case.v), pool


def assert_matches_torch(case: Case, atol: float = 1e-4, **kw) -> None:
    out, _ = run(TritonAttentionBackend, case, **kw)
    expected, _ = run(TorchAttentionBackend, case)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefill_over_a_cached_prefix_matches_torch(page_size):
    assert_matches_torch(make_case([0, 13, 5], [9, 6, 20], page_size))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_chunked_prefill_mixed_with_decode_matches_torch(page_size):
    assert_matches_torch(make_case([0, 7, 20, 5, 33], [6, 4, 1, 1, 1], page_size, seed=1))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_only_batch_matches_torch(page_size):
    assert_matches_torch(make_case([3, 40, 17], [1, 1, 1], page_size, seed=2))


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_decode_matches_torch(splits):
    """Split-K decode, including splits past a short request's end (they hold no keys)."""
    case = make_case([90, 2, 47], [1, 1, 1], 4, seed=3)
    assert_matches_torch(case, decode_splits=splits)


def test_split_decode_with_small_tiles_matches_one_split():
    """Every split gets keys when tiles are small; the reduce kernel merges them."""
    case = make_case([70, 33], [1, 1], 4, seed=4)
    pool = case.pool
    pool.k[0].view(-1, 2, 16)[case.batch.slot_mapping] = case.k
    pool.v[0].view(-1, 2, 16)[case.batch.slot_mapping] = case.v
    backend = TritonAttentionBackend(case.info, pool)
    backend.prepare(case.batch)
    outs = [
        triton_attention.decode_attention(
            case.q,
            pool.k[0],
            pool.v[0],
            backend.page_table,
            backend.seq_lens,
            backend.scale,
            torch.empty_like(case.q),
            num_splits=splits,
            block_n=16,
        )  # fmt: skip
        for splits in (1, 4)
    ]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_gqa_group_of_three_and_head_dim_24_match_torch():
    """A group size and a head size that are not powers of two (padded, masked lanes)."""
    case = make_case([5, 0, 11], [3, 17, 1], 4, heads=9, kv_heads=3, head_dim=24, seed=5)
    assert_matches_torch(case)
    decode = make_case([5, 30], [1, 1], 4, heads=9, kv_heads=3, head_dim=24, seed=6)
    assert_matches_torch(decode, decode_splits=2)


def test_multi_head_attention_without_grouping_matches_torch():
    assert_matches_torch(make_case([4, 0], [5, 8], 4, heads=2, kv_heads=2, seed=7))
    assert_matches_torch(make_case([4, 9], [1, 1], 4, heads=2, kv_heads=2, seed=7))


BF16_ON_CPU = pytest.mark.skipif(
    DEVICE.type == "cpu",
    reason="Triton's CPU interpreter computes bf16 tl.dot wrongly (seen with triton 3.9); "
    "bf16 is checked on the GPU",
)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=BF16_ON_CPU), torch.float16])
def test_half_precision_inputs_match_torch(dtype):
    assert_matches_torch(make_case([6, 0], [5, 9], 4, dtype=dtype, seed=8), atol=2e-2)
    assert_matches_torch(make_case([6, 21], [1, 1], 4, dtype=dtype, seed=8), atol=2e-2)


def test_new_keys_and_values_are_written_at_the_slot_mapping():
    case = make_case([2, 0, 9], [3, 5, 1], 4, seed=9)
    before = copy.deepcopy(case.pool)
    _, pool = run(TritonAttentionBackend, case, layer=1)
    slots = case.batch.slot_mapping
    assert torch.equal(pool.k[1].view(-1, 2, 16)[slots], case.k)
    assert torch.equal(pool.v[1].view(-1, 2, 16)[slots], case.v)
    untouched = torch.ones(pool.k[1].view(-1, 2, 16).shape[0], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(pool.k[1].view(-1, 2, 16)[untouched], before.k[1].view(-1, 2, 16)[untouched])
    assert torch.equal(pool.k[0], before.k[0]) and torch.equal(pool.v[0], before.v[0])


def test_store_kv_skips_padding_slots():
    case = make_case([0], [4], 4, seed=10)
    pool = case.pool
    before = pool.k[0].clone()
    slots = torch.tensor([5, -1, 2, -1], device=DEVICE)
    triton_attention.store_kv(case.k, case.v, pool.k[0], pool.v[0], slots)
    flat = pool.k[0].view(-1, 2, 16)
    assert torch.equal(flat[[5, 2]], case.k[[0, 2]])
    flat[[5, 2]] = before.view(-1, 2, 16)[[5, 2]]
    assert torch.equal(pool.k[0], before)


def test_block_map_covers_every_new_token_once():
    block_map = triton_attention.build_block_map([5, 1, 12], tokens_per_block=4)
    assert block_map.tolist() == [[0, 0], [0, 4], [1, 0], [2, 0], [2, 4], [2, 8]]


def test_metadata_tensors_are_filled_in_place_across_steps():
    """Fixed addresses while the batch fits (what CUDA graph replay needs); growth beyond."""
    first = make_case([3, 40, 17], [1, 1, 1], 4, seed=11)
    backend = TritonAttentionBackend(first.info, first.pool)
    backend.prepare(first.batch)
    ptrs = [t.data_ptr() for t in (backend.page_table, backend.seq_lens, backend.query_starts)]
    second = make_case([8, 2], [1, 1], 4, seed=12)
    backend.prepare(second.batch)
    assert [t.data_ptr() for t in (backend.page_table, backend.seq_lens)] == ptrs[:2]
    assert backend.seq_lens[:2].tolist() == [9, 3]
    assert backend.prefix_lens[:2].tolist() == [8, 2]
    big = make_case([1] * 70, [1] * 70, 4, seed=13)
    backend.prepare(big.batch)
    assert backend.max_requests >= 70
    assert backend.seq_lens[:70].tolist() == [2] * 70


def test_an_unchanged_block_map_or_small_page_table_is_not_uploaded_again(monkeypatch):
    """Verify steps of one layout (every request `q` rows: a verify graph's) have the same
    block map: it is uploaded once, and again only when it changes (here: as many blocks). A
    small page table that did not change (batch 1 gains a page only every few steps) is not
    uploaded again either; the metadata (sequence lengths) is, every step."""
    from pegboard.plugins.kernels import attention_triton as A

    first = make_case([9, 14], [5, 5], 4, seed=21)
    backend = TritonAttentionBackend(first.info, first.pool)
    real, targets = A._upload, []
    monkeypatch.setattr(A, "_upload", lambda dst, a: (targets.append(dst.data_ptr()), real(dst, a)))
    counts = []
    steps = [([9, 14], [5, 5]), ([11, 20], [5, 5]), ([11, 20], [5, 5]), ([40], [33])]
    for seq_lens, query_lens in steps:
        case = make_case(seq_lens, query_lens, 4, seed=22)  # steps 1 and 2: the same table
        backend.prepare(case.batch)
        tensors = (backend.block_map, backend.page_table, backend.request_meta)
        counts.append([targets.count(t.data_ptr()) for t in tensors])
    assert counts == [[1, 1, 1], [1, 2, 2], [1, 2, 3], [2, 3, 4]]
    expected = triton_attention.build_block_map([33], backend.tokens_per_block)
    assert backend.block_map[: len(expected)].tolist() == expected.tolist()
    table = case.batch.page_tables_cpu[0]
    assert backend.page_table[0, : len(table)].tolist() == table


def test_plugin_passes_the_conformance_kit():
    from pegboard.sdk.testing import check_attention

    check_attention(TritonAttention, device=DEVICE.type)


def test_plugin_returns_a_backend_over_the_given_pool():
    case = make_case([0], [1], 4)
    backend = TritonAttention().attention_kernel(model=case.info, pool=case.pool)
    assert isinstance(backend, TritonAttentionBackend)
    assert backend.pool is case.pool and backend.scale == pytest.approx(16**-0.5)


def test_plugin_is_discovered_under_the_name_triton():
    from pegboard.core.plugin_manager import PluginManager

    info = PluginManager().find("attention", "triton")
    assert info.cls is TritonAttention


def test_selecting_it_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        TritonAttention().setup(PluginContext(device=torch.device("cpu")))


def test_selecting_it_without_triton_says_why(monkeypatch):
    from pegboard.plugins.kernels import attention_triton

    monkeypatch.setattr(attention_triton.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="`triton` package, which is not installed"):
        TritonAttention().setup(PluginContext(device=DEVICE))


def test_greedy_generation_equals_the_torch_backend(tiny_llama_dir):
    """End to end through the engine: prefill, chunked prefill and decode steps. The KV
    cache is sized in tokens: on a GPU the first engine's pool would otherwise leave the
    second one no free memory to size its pool from."""
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    prompts = [[5, 9, 13, 2, 7], [11] * 23, [3, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    outs = {}
    for attention in ("torch", "triton"):
        with LLM(
            str(tiny_llama_dir), attention=attention, dtype="float32", device=str(DEVICE),
            page_size=4, max_num_batched_tokens=16, kv_cache_tokens=1024,
        ) as llm:  # fmt: skip
            outs[attention] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]


# ------------------------------------------------------------------ GPU, realistic shapes


def gpu_case(cached: list[int], new: list[int]) -> Case:
    return make_case(cached, new, 16, 32, 8, 128, torch.bfloat16, seed=0, layers=1)


@pytest.mark.gpu
def test_gpu_bf16_decode_64_requests_of_1024_tokens_matches_torch():
    case = gpu_case([1023] * 64, [1] * 64)
    out, _ = run(TritonAttentionBackend, case, layer=0)
    expected, _ = run(TorchAttentionBackend, case, layer=0)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_bf16_prefill_and_mixed_batch_match_torch():
    case = gpu_case([0, 0, 512, 0, 100, 2000], [1024, 777, 256, 1, 1, 1])
    out, _ = run(TritonAttentionBackend, case, layer=0)
    expected, _ = run(TorchAttentionBackend, case, layer=0)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_forward_never_synchronizes_with_the_device():
    for case in (gpu_case([500] * 8, [1] * 8), gpu_case([0, 300], [200, 1])):
        backend = TritonAttentionBackend(case.info, case.pool)
        backend.prepare(case.batch)
        backend.forward(0, case.q, case.k, case.v)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.forward(0, case.q, case.k, case.v)
        finally:
            torch.cuda.set_sync_debug_mode("default")
