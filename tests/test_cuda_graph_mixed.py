"""CUDA graphs for mixed steps (`pegboard.core.cuda_graph_mixed`): token-count buckets, the
Triton backend's shape-static padded layout, and replayed mixed steps giving the eager path's
tokens.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before Triton is imported) and the graph runner is built with `capture=False`: each "graph"
runs the model eagerly over the same static, padded rows a captured graph reads, so the
layout (bucket, static inputs, padding rows, output rows) is checked here; the `gpu` tests
compare real replays with the eager path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fixtures.devices import GPU_ENGINE

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.config import EngineConfig  # noqa: E402
from pegboard.core.cuda_graph import padded_size  # noqa: E402
from pegboard.core.cuda_graph_mixed import (  # noqa: E402
    MixedGraphRunner,
    mixed_graph_max_tokens,
    mixed_token_sizes,
)
from pegboard.core.llm import LLM  # noqa: E402
from pegboard.plugins.kernels import triton_attention  # noqa: E402
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request, SamplingParams  # noqa: E402

CPU = torch.device("cpu")

# ------------------------------------------------------------------ token-count buckets


def test_mixed_sizes_step_by_a_quarter_doubling_from_64_up_to_the_max():
    assert mixed_token_sizes(256) == [
        2, 4, 8, 16, 32, 64, 80, 96, 112, 128, 160, 192, 224, 256,
    ]  # fmt: skip
    assert mixed_token_sizes(300)[-3:] == [224, 256, 300]
    assert mixed_token_sizes(20) == [2, 4, 8, 16, 20]
    assert mixed_token_sizes(0) == []
    sizes = mixed_token_sizes(2048)
    assert len(sizes) == 26  # the default's captures
    worst = max(padded_size(t, sizes) / t for t in range(64, 2049))  # past 64 tokens
    assert worst <= 1.25


def test_mixed_graph_tokens_follow_the_config():
    # by default every chunk of a prefill replays a graph: the whole step budget
    assert mixed_graph_max_tokens(EngineConfig()) == 8192
    assert mixed_graph_max_tokens(EngineConfig(max_num_batched_tokens=16384)) == 8192
    assert mixed_graph_max_tokens(EngineConfig(max_num_batched_tokens=512)) == 512
    assert mixed_graph_max_tokens(EngineConfig(disable_cuda_graph=True)) == 0
    assert mixed_graph_max_tokens(EngineConfig(cuda_graph_max_bs=0)) == 0
    assert mixed_graph_max_tokens(EngineConfig(cuda_graph_mixed_max_tokens=0)) == 0


def test_the_cli_flag_sets_the_mixed_graph_tokens():
    import argparse

    from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    args = p.parse_args(["--cuda-graph-mixed-max-tokens", "0"])
    assert EngineConfig(**engine_settings(args)).cuda_graph_mixed_max_tokens == 0


def test_mixed_graphs_stay_off_with_the_reason_for_an_unfit_backend_or_a_failed_capture(
    tiny_llama_dir,
):
    from pegboard.sdk.slots import AttentionBackend

    class Failing(AttentionBackend):
        supports_cuda_graph_mixed = True

        def prepare_for_mixed_capture(self, max_tokens):
            raise RuntimeError("no room")

    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_tokens=256) as llm:
        runner = llm.engine.runner
        assert runner.mixed_graphs is None and "CUDA device" in runner.mixed_graph_off_reason
        plain = AttentionBackend(runner.info, runner.attention.pool)
        runner._capture_mixed(plain, 8, 64)
        assert "has no mixed-step CUDA graphs" in runner.mixed_graph_off_reason
        runner._capture_mixed(plain, 8, 0)
        assert "disabled" in runner.mixed_graph_off_reason
        runner._capture_mixed(Failing(runner.info, runner.attention.pool), 8, 64)
        assert runner.mixed_graphs is None
        assert runner.mixed_graph_off_reason == "capture failed: RuntimeError: no room"


# ------------------------------------------------------------------ a grid fixed by the rows


@pytest.mark.parametrize("seed", range(5))
def test_no_batch_needs_more_query_blocks_than_the_bound(seed):
    rng = np.random.default_rng(seed)
    tpb, cap = 32, 16
    for _ in range(200):
        n = int(rng.integers(1, cap + 1))
        lens = rng.integers(1, 100, size=n)
        rows = int(lens.sum()) + int(rng.integers(0, 40))
        blocks = triton_attention.build_block_map(lens, tpb)
        assert len(blocks) <= triton_attention.max_blocks(rows, cap, tpb)


def test_padding_blocks_belong_to_request_minus_one():
    blocks = triton_attention.build_block_map(np.array([40, 1]), 32)
    padded = triton_attention.padded_block_map(blocks, 6)
    assert padded.tolist() == [[0, 0], [0, 32], [1, 0], [-1, 0], [-1, 0], [-1, 0]]


def _backend(max_requests=4, num_pages=32, page_size=4):
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

    info = ModelInfo(
        architecture="LlamaForCausalLM", num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=16, hidden_size=64, vocab_size=32, max_model_len=128,
        dtype=torch.float32, device=CPU,
    )  # fmt: skip
    pool = KVPool.allocate(info, num_pages=num_pages, page_size=page_size)
    backend = TritonAttentionBackend(info, pool, max_requests=max_requests)
    backend.prepare_for_capture(max_requests)
    backend.prepare_for_mixed_capture(64)
    return backend


def _padded_batch(cached, new, rows, page_size=4):
    """A batch of requests with `cached` tokens and `new` new tokens each, laid out in `rows`
    rows (the rest slot -1), pages allocated consecutively."""
    slots, tables, page = [], [], 0
    for c, n in zip(cached, new):
        pages = -(-(c + n) // page_size)
        table = list(range(page, page + pages))
        page += pages
        tables.append(table)
        slots += [table[p // page_size] * page_size + p % page_size for p in range(c, c + n)]
    t = sum(new)
    return ForwardBatch(
        requests=[Request([1]) for _ in new],
        input_ids=torch.zeros(rows, dtype=torch.int64),
        positions=torch.tensor([p for c, n in zip(cached, new) for p in range(c, c + n)]
                               + [0] * (rows - t)),
        slot_mapping=torch.tensor(slots + [-1] * (rows - t)),
        query_lens_cpu=list(new),
        seq_lens_cpu=[c + n for c, n in zip(cached, new)],
        page_tables_cpu=tables,
        logits_indices=torch.arange(len(new)),
        samples=[True] * len(new),
    )  # fmt: skip


def test_triton_mixed_prepare_launches_one_grid_per_row_count():
    backend = _backend()
    seen = set()
    for cached, new in (([3, 0], [1, 9]), ([0], [17]), ([5, 2, 7, 1], [1, 1, 14, 1])):
        backend.prepare_mixed(_padded_batch(cached, new, rows=32))
        assert not backend.is_decode  # the extend kernel, even beside decodes
        assert backend.step_block_map is backend.mixed_block_map
        seen.add(backend.num_blocks)
        table = backend.mixed_block_map[: backend.num_blocks].tolist()
        real = len(triton_attention.build_block_map(np.array(new), backend.tokens_per_block))
        assert all(r == -1 for r, _ in table[real:]) and all(r >= 0 for r, _ in table[:real])
    assert seen == {triton_attention.max_blocks(32, 4, backend.tokens_per_block)}


def test_triton_mixed_prepare_needs_the_mixed_capacity():
    backend = _backend()
    with pytest.raises(RuntimeError, match="prepare_for_mixed_capture"):
        backend.prepare_mixed(_padded_batch([0, 1], [2, 1], rows=128))


def test_padding_blocks_and_rows_change_no_real_row_and_store_nothing():
    """The extend kernel over a padded layout (blocks of request -1, rows of slot -1) gives
    the unpadded batch's outputs on the real rows and leaves the pool's other slots alone."""
    gen = torch.Generator().manual_seed(0)
    cached, new, rows = [6, 0, 3], [1, 11, 1], 16
    q_all, k_all, v_all = (torch.randn(rows, h, 16, generator=gen) for h in (4, 2, 2))
    outs, pools = [], []
    for padded in (False, True):
        backend = _backend()
        for t in backend.pool.k + backend.pool.v:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        batch = _padded_batch(cached, new, rows=rows if padded else sum(new))
        n = batch.num_tokens
        (backend.prepare_mixed if padded else backend.prepare)(batch)
        outs.append(backend.forward(0, q_all[:n], k_all[:n], v_all[:n])[: sum(new)])
        pools.append((backend.pool.k[0].clone(), backend.pool.v[0].clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(*pools):
        assert torch.equal(a, b)


def test_a_padding_block_writes_no_output():
    backend = _backend()
    backend.prepare(_padded_batch([5], [9], rows=9))
    blocks = torch.from_numpy(triton_attention.padded_block_map(np.zeros((0, 2), np.int32), 3))
    q = torch.randn(9, 4, 16)
    out = torch.full_like(q, 7.0)
    triton_attention.extend_attention(
        q, backend.pool.k[0], backend.pool.v[0], backend.page_table, backend.prefix_lens,
        backend.query_starts, blocks, 3, 0.25, out,
    )  # fmt: skip
    assert torch.all(out == 7.0)


# ------------------------------------------------------------------ the engine, layout eagerly


def _install_eager_mixed_graphs(llm: LLM, max_tokens: int) -> MixedGraphRunner:
    """The mixed-graph runner a GPU engine builds, on the CPU: graphs run eagerly."""
    runner, config = llm.engine.runner, llm.engine.config
    runner.attention.prepare_for_capture(config.max_running_requests)
    runner.mixed_graphs = MixedGraphRunner(
        runner.model,
        runner.attention,
        mixed_token_sizes(max_tokens),
        config.max_running_requests,
        runner.device,
        capture=False,
    )
    return runner.mixed_graphs


def _staggered_generate(llm: LLM, prompts, max_tokens=(6, 3, 5, 4)) -> list[list[int]]:
    """Greedy tokens, with later prompts admitted while earlier ones decode (mixed steps)."""
    engine = llm.engine
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens[i % len(max_tokens)], temperature=0.0)
        requests.append(Request(list(prompt), params, request_id=f"r{i}"))
    pending = list(requests)
    engine.add_request(pending.pop(0))
    while engine.has_work() or pending:
        engine.step()
        if pending:
            engine.add_request(pending.pop(0))
    return [r.output_token_ids for r in requests]


PROMPTS = [[5 + i, 9, 13, 2 * i + 3, 7, 11, 4 + i, 8, 6][: 4 + 2 * i] for i in range(4)]


def test_mixed_steps_through_the_padded_layout_give_the_eager_tokens(tiny_llama_dir):
    settings = dict(
        dtype="float32", device="cpu", kv_cache_tokens=256, page_size=4, attention="triton",
        max_num_batched_tokens=8, max_running_requests=4, disable_overlap=True,
    )  # fmt: skip
    with LLM(str(tiny_llama_dir), **settings) as llm:
        eager = _staggered_generate(llm, PROMPTS)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        graphs = _install_eager_mixed_graphs(llm, max_tokens=8)
        pool = llm.engine.runner.attention.pool
        padded_stores = []
        real_store = pool.k[0].clone()

        def watch(batch, size, layout=graphs.layout):
            out = layout(batch, size)
            padded_stores.append(out.slot_mapping[batch.num_tokens :].tolist())
            return out

        graphs.layout = watch
        laid_out = _staggered_generate(llm, PROMPTS)
        assert not torch.equal(real_store, pool.k[0])  # KV was written (by real rows)
    assert graphs.num_replays >= 2  # mixed steps (chunked prefill beside decodes) replayed
    assert graphs.report()["replays"] == graphs.num_replays and graphs.report()["sizes"] == 3
    assert any(padded_stores) and all(s == -1 for row in padded_stores for s in row)
    assert laid_out == eager


# ------------------------------------------------------------------ GPU: replay equals eager


def _gpu_run(model_dir, prompts, max_tokens=(12, 5, 9, 7), **settings):
    """Greedy tokens of staggered admissions (chunked prefill beside decodes) on CUDA, and the
    runner's mixed-graph runner (None: off) with its reason."""
    base = GPU_ENGINE | dict(  # the detokenizer inline: GPU_ENGINE in tests/fixtures/devices.py
        attention="triton", page_size=4, kv_cache_tokens=4096,
        cuda_graph_max_bs=8, max_num_batched_tokens=32, max_running_requests=8,
    )  # fmt: skip
    with LLM(str(model_dir), **(base | settings)) as llm:
        tokens = _staggered_generate(llm, prompts, max_tokens)
        runner = llm.engine.runner
        return tokens, runner.mixed_graphs, runner.mixed_graph_off_reason


def _long_prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 5 * j) % 240 + 4 for j in range(6 + 9 * i % 50)] for i in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_mixed_graphs_equal_eager_mixed_steps(tiny_llama_dir, dtype, overlap):
    prompts = _long_prompts(7)
    kw = dict(dtype=dtype, disable_overlap=not overlap)
    graphed, graphs, reason = _gpu_run(tiny_llama_dir, prompts, **kw)
    assert graphs is not None, reason
    assert graphs.num_replays >= 5
    eager, none, reason = _gpu_run(tiny_llama_dir, prompts, cuda_graph_mixed_max_tokens=0, **kw)
    assert none is None and "disabled" in reason
    assert graphed == eager
    if dtype == "float32":
        reference, _, _ = _gpu_run(tiny_llama_dir, prompts, attention="torch", **kw)
        assert graphed == reference


@pytest.mark.gpu
def test_gpu_mixed_graphs_serve_chunks_beside_ngram_verify_rows(tiny_llama_dir):
    from test_speculative import repetitive_prompts

    prompts = repetitive_prompts(512, n=6)
    kw = dict(dtype="float32", speculator="ngram")
    graphed, graphs, reason = _gpu_run(tiny_llama_dir, prompts, (16,), **kw)
    assert graphs is not None and graphs.num_replays > 0, reason
    eager, _, _ = _gpu_run(tiny_llama_dir, prompts, (16,), cuda_graph_mixed_max_tokens=0, **kw)
    plain, _, _ = _gpu_run(tiny_llama_dir, prompts, (16,), dtype="float32")
    assert graphed == eager == plain


@pytest.mark.gpu
def test_gpu_steps_past_the_largest_mixed_graph_run_eagerly(tiny_llama_dir):
    prompts = _long_prompts(5)
    graphed, graphs, _ = _gpu_run(
        tiny_llama_dir, prompts, dtype="float32", cuda_graph_mixed_max_tokens=16
    )
    assert graphs.sizes == [2, 4, 8, 16] and graphs.num_replays > 0
    eager, _, _ = _gpu_run(tiny_llama_dir, prompts, dtype="float32", disable_cuda_graph=True)
    assert graphed == eager
