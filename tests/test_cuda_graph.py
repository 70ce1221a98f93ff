"""CUDA graphs for decode steps (`pegboard.core.cuda_graph`): batch-size buckets, when graphs
are off and why, the Triton backend's fixed metadata, and (on a GPU) that replayed decode
steps give the eager path's tokens, also across an attention swap."""

from __future__ import annotations

import argparse

import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings
from pegboard.core.config import EngineConfig
from pegboard.core.cuda_graph import capture_sizes, padded_size
from pegboard.core.llm import LLM
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request, SamplingParams

# ------------------------------------------------------------------ batch-size buckets


def test_capture_sizes_are_powers_of_two_to_8_then_multiples_of_8_up_to_the_max():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    assert capture_sizes(0) == []


def test_a_batch_is_padded_to_the_smallest_size_that_holds_it():
    sizes = capture_sizes(32)
    assert [padded_size(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 17, 24, 25, 32)] == [
        1, 2, 4, 4, 8, 8, 16, 24, 24, 32, 32,
    ]  # fmt: skip
    assert padded_size(33, sizes) is None


# ------------------------------------------------------------------ off, and why


def test_graphs_are_off_on_cpu_and_the_runner_says_why(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_tokens=256) as llm:
        runner = llm.engine.runner
        assert runner.cuda_graphs is None
        assert "CUDA graphs need a CUDA device" in runner.cuda_graph_off_reason
        out = llm.generate([[5, 9, 13]], SamplingParams(max_tokens=3, temperature=0.0))
        assert len(out[0].token_ids) == 3


def test_disable_flag_turns_graphs_off_with_that_reason(tiny_llama_dir):
    with LLM(
        str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_tokens=256,
        disable_cuda_graph=True,
    ) as llm:  # fmt: skip
        assert llm.engine.runner.cuda_graphs is None
        assert "disabled" in llm.engine.runner.cuda_graph_off_reason


def test_the_reference_backend_does_not_claim_graph_support():
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend

    assert AttentionBackend.supports_cuda_graph is False
    assert TorchAttentionBackend.supports_cuda_graph is False


def test_cli_flags_set_the_graph_settings():
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    config = EngineConfig(
        **engine_settings(p.parse_args(["--disable-cuda-graph", "--cuda-graph-max-bs", "48"]))
    )
    assert config.disable_cuda_graph is True
    assert config.cuda_graph_max_bs == 48
    defaults = EngineConfig(**engine_settings(p.parse_args([])))
    assert (defaults.disable_cuda_graph, defaults.cuda_graph_max_bs) == (False, 256)


# ------------------------------------------------------------------ Triton backend metadata


def _triton_backend(max_model_len: int = 256):
    pytest.importorskip("triton", reason="triton is not installed")
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

    info = ModelInfo(
        architecture="LlamaForCausalLM", num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=16, hidden_size=64, vocab_size=32, max_model_len=max_model_len,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    pool = KVPool.allocate(info, num_pages=64, page_size=4)
    return TritonAttentionBackend(info, pool, max_requests=2)


def _decode_batch(seq_lens: list[int], page_size: int = 4) -> ForwardBatch:
    n = len(seq_lens)
    return ForwardBatch(
        requests=[Request([1]) for _ in range(n)],
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.tensor([s - 1 for s in seq_lens]),
        slot_mapping=torch.arange(n),
        query_lens_cpu=[1] * n,
        seq_lens_cpu=seq_lens,
        page_tables_cpu=[list(range(-(-s // page_size))) for s in seq_lens],
        logits_indices=torch.arange(n),
        samples=[True] * n,
    )


def test_triton_metadata_keeps_its_addresses_after_prepare_for_capture():
    backend = _triton_backend()
    assert backend.supports_cuda_graph
    backend.prepare_for_capture(16)
    tensors = (backend.page_table, backend.request_meta, backend.seq_lens)
    addresses = [t.data_ptr() for t in tensors]
    for seq_lens in ([3], [256] * 16, [1, 200, 17]):
        backend.prepare(_decode_batch(seq_lens))
        assert [t.data_ptr() for t in tensors] == addresses
    assert backend.seq_lens[:3].tolist() == [1, 200, 17]
    assert backend.seq_lens[3:].tolist() == [0] * 13  # padded rows attend to nothing


def test_triton_batch_beyond_the_fixed_capacity_raises_instead_of_reallocating():
    backend = _triton_backend()
    backend.prepare_for_capture(4)
    with pytest.raises(RuntimeError, match="capacity fixed for CUDA graphs"):
        backend.prepare(_decode_batch([5] * 5))


# ------------------------------------------------------------------ GPU: replay equals eager


def _generate(model_dir, prompts, max_tokens=16, swaps=None, **settings):
    """Greedy tokens per prompt, the graph runners that served decode steps (a recapture adds
    one) and the final model runner; `swaps` maps a step number to `(slot, name, options)`
    swapped before that step."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    # Graphs just past what the prompts need (17 requests, their 163 prompt tokens in one
    # mixed-graph step) and the detokenizer inline (a process of its own costs each engine
    # seconds to start; tokens are compared here): GPU_ENGINE in tests/fixtures/devices.py.
    base = GPU_ENGINE | dict(page_size=4, kv_cache_tokens=4096, cuda_graph_max_bs=24,
                             cuda_graph_mixed_max_tokens=256)  # fmt: skip
    with LLM(str(model_dir), **(base | settings)) as llm:
        engine = llm.engine
        requests = [Request(list(p), params) for p in prompts]
        for r in requests:
            engine.add_request(r)
        step, graph_runners = 0, []
        while engine.has_work():
            if swaps and step in swaps:
                slot, name, options = swaps[step]
                llm.swap(slot, name, **options)
            engine.step()
            graphs = engine.runner.cuda_graphs
            if graphs is not None and graphs not in graph_runners:
                graph_runners.append(graphs)
            step += 1
        return [r.output_token_ids for r in requests], graph_runners, engine.runner


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 250 + 4 for j in range(5 + 3 * i % 11)] for i in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch_size", [1, 3, 17])
def test_gpu_graph_decode_equals_eager_decode(tiny_llama_dir, dtype, batch_size):
    prompts = _prompts(batch_size)
    graphed, graphs, runner = _generate(tiny_llama_dir, prompts, attention="triton", dtype=dtype)
    assert runner.cuda_graphs is not None, runner.cuda_graph_off_reason
    assert graphs[0].num_replays >= 15  # every decode step after the prefill step replayed
    eager, none, runner = _generate(
        tiny_llama_dir, prompts, attention="triton", dtype=dtype, disable_cuda_graph=True
    )
    assert none == [] and runner.cuda_graphs is None
    assert graphed == eager
    if dtype == "float32":
        reference, _, _ = _generate(tiny_llama_dir, prompts, attention="torch", dtype=dtype)
        assert graphed == reference


@pytest.mark.gpu
def test_gpu_torch_backend_runs_without_graphs(tiny_llama_dir):
    _, graphs, runner = _generate(tiny_llama_dir, _prompts(2), attention="torch", max_tokens=4)
    assert graphs == [] and runner.cuda_graphs is None
    assert "does not support CUDA graphs" in runner.cuda_graph_off_reason


@pytest.mark.gpu
def test_gpu_attention_swap_recaptures_and_keeps_outputs(tiny_llama_dir):
    prompts = _prompts(5)
    kw = dict(attention="triton", dtype="float32")
    reference, _, _ = _generate(tiny_llama_dir, prompts, **kw)
    swap = {4: ("attention", "triton", {"decode_splits": 2})}
    swapped, graphs, runner = _generate(tiny_llama_dir, prompts, swaps=swap, **kw)
    assert swapped == reference
    assert len(graphs) == 2 and all(g.num_replays > 0 for g in graphs)
    assert runner.cuda_graphs.attention.decode_splits == 2
    to_torch, graphs, runner = _generate(
        tiny_llama_dir, prompts, swaps={4: ("attention", "torch", {})}, **kw
    )
    assert to_torch == reference
    assert len(graphs) == 1 and runner.cuda_graphs is None


@pytest.mark.gpu
def test_gpu_kv_cache_swap_recaptures_over_the_new_pool(tiny_llama_dir):
    prompts = _prompts(3)
    kw = dict(attention="triton", dtype="float32")
    reference, _, _ = _generate(tiny_llama_dir, prompts, **kw)
    swap = {4: ("kv_cache", "paged", {})}
    swapped, graphs, runner = _generate(tiny_llama_dir, prompts, swaps=swap, **kw)
    assert swapped == reference
    assert len(graphs) == 2 and graphs[-1].attention.pool is runner.attention.pool
    assert graphs[-1].num_replays > 0
