"""GPU memory sizing: the KV pool takes what remains after the weights, one step's activation
peak (a profile run) and the reserved share, so the largest step cannot run out of memory."""

from __future__ import annotations

import gc

import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams

pytestmark = pytest.mark.gpu


def test_activation_profile_grows_with_the_step_size(tiny_llama_dir):
    # (graphs of up to 8 requests: the profile runs eagerly; GPU_ENGINE: the detokenizer inline)
    with LLM(
        str(tiny_llama_dir), dtype="bfloat16", kv_cache_tokens=4096, cuda_graph_max_bs=8,
        cuda_graph_mixed_max_tokens=64, **GPU_ENGINE,
    ) as llm:  # fmt: skip
        runner = llm.engine.runner
        small = runner.profile_activation_bytes(256, 16)
        large = runner.profile_activation_bytes(8192, 256)
    assert 0 < small < large
    # At least the float32 logits of 256 rows and their softmax must be counted.
    assert large >= 2 * 256 * llm.engine.info.vocab_size * 4


def test_largest_step_fits_beside_the_pool(tiny_llama_dir):
    util, tokens = 0.3, 8192
    gc.collect()  # engines of earlier tests
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    with LLM(
        str(tiny_llama_dir),
        dtype="bfloat16",
        gpu_memory_utilization=util,
        max_num_batched_tokens=tokens,
        max_running_requests=64,
        disable_cuda_graph=True,
        **GPU_ENGINE,
    ) as llm:
        pool_bytes = (
            llm.engine.kv.num_pages
            * llm.engine.kv.page_size
            * 2
            * (
                llm.engine.info.num_layers
                * llm.engine.info.num_kv_heads
                * llm.engine.info.head_dim
                * 2
            )
        )
        assert pool_bytes > 0
        torch.cuda.reset_peak_memory_stats()
        prompts = [[7 + (i % 50)] * 120 for i in range(64)]  # 7,680 prompt tokens in one step
        outs = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), progress=False)
        assert all(len(o.token_ids) == 4 for o in outs)
        peak = torch.cuda.max_memory_allocated()
    # What the engine allocated (weights, pool, the largest step) fits in what was free less
    # the share kept back.
    budget = free - (1 - util) * total
    assert peak - allocated <= budget, ((peak - allocated) / 2**30, budget / 2**30)
    assert pool_bytes > 0.5 * budget  # and the pool did take most of it


def test_no_memory_left_for_kv_is_a_clear_error(tiny_llama_dir):
    from pegboard.core.engine import ACTIVATION_ALLOWANCE, KVMemoryError

    # A utilisation whose share of this card is smaller than the activation allowance alone,
    # whatever the card's size (0.01 of an 80 GB card left nothing; of a 141 GB H200, 1.4 GB).
    _, total = torch.cuda.mem_get_info()
    util = ACTIVATION_ALLOWANCE / 2 / total
    with pytest.raises(KVMemoryError, match="no device memory is left for the KV cache"):
        LLM(str(tiny_llama_dir), dtype="bfloat16", gpu_memory_utilization=util)


def test_cuda_engine_defaults_to_the_triton_backend(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="bfloat16", kv_cache_tokens=1024) as llm:
        assert llm.engine.plugins.active("attention").name == "triton"
        assert llm.engine.runner.cuda_graphs is not None
    with LLM(str(tiny_llama_dir), dtype="bfloat16", kv_cache_tokens=1024, attention="torch") as llm:
        assert llm.engine.plugins.active("attention").name == "torch"
