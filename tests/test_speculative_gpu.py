"""Speculative decoding on CUDA with the Triton attention backend: the verify forward is an
ordinary multi-token extend over the paged KV, so greedy outputs (float32) equal the
non-speculative ones, with decode CUDA graphs on for the steps that do not draft. Draft trees are
verified whole by the Triton extend kernel's tree mask and by the torch backend's."""

from __future__ import annotations

import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams
from test_speculative import MAX_NEW, oracle_plugins, repetitive_prompts

pytestmark = pytest.mark.gpu


def run(model_dir, prompts, plugins=None, **settings):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    # Graphs for the 16 requests (their 283 prompt tokens in one mixed-graph step), a KV
    # pool of their size rather than of the free device memory (no profile run) and the
    # detokenizer inline (GPU_ENGINE in tests/fixtures/devices.py): per engine, not per test.
    settings = dict(attention="triton", kv_cache_tokens=8192, cuda_graph_max_bs=16,
                    cuda_graph_mixed_max_tokens=512) | settings  # fmt: skip
    with LLM(str(model_dir), dtype="float32", plugins=plugins, **GPU_ENGINE, **settings) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        return outs, llm.engine.speculation.stats()


@pytest.fixture(scope="module")
def gpu_case(tiny_llama_dir):
    assert torch.cuda.is_available()
    prompts = repetitive_prompts(512, n=16)
    plain, _ = run(tiny_llama_dir, prompts)
    return tiny_llama_dir, prompts, plain


@pytest.mark.parametrize("settings", [{}, {"kv_cache": "radix", "page_size": 4}])
def test_triton_verify_with_rejections_equals_plain_decoding(gpu_case, settings):
    model_dir, prompts, plain = gpu_case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, plain)}, wrong_every=3)
    outs, stats = run(model_dir, prompts, pm, speculator="oracle", **settings)
    assert outs == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_triton_target_as_its_own_draft_is_always_accepted(gpu_case):
    model_dir, prompts, plain = gpu_case
    options = {"draft": {"model_path": str(model_dir), "num_draft_tokens": 4}}
    outs, stats = run(model_dir, prompts, speculator="draft", plugin_options=options)
    assert outs == plain
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0


def test_triton_ngram_equals_plain_decoding(gpu_case):
    model_dir, prompts, plain = gpu_case
    outs, _ = run(model_dir, prompts, speculator="ngram")
    assert outs == plain


def test_triton_verify_with_an_eagle3_head_equals_plain_decoding(gpu_case, tmp_path):
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, plain = gpu_case
    options = {"eagle": {"model_path": str(build_eagle3_head(tmp_path / "head"))}}
    outs, stats = run(model_dir, prompts, speculator="eagle", plugin_options=options)
    assert outs == plain
    assert stats["spec_draft_tokens"] > 0


def test_triton_verifies_whole_trees(gpu_case):
    """The extend kernel's tree mask: the right child comes last (KV compacted)."""
    from test_speculative_tree import tree_plugins

    model_dir, prompts, plain = gpu_case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, plain)}, right_first=False)
    outs, stats = run(model_dir, prompts, pm, speculator="tree_oracle")
    assert outs == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_torch_backend_on_cuda_verifies_trees(gpu_case):
    """The torch backend's tree mask on CUDA: the right child comes last (KV compacted)."""
    from test_speculative_tree import tree_plugins

    model_dir, prompts, plain = gpu_case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, plain)}, right_first=False)
    outs, stats = run(model_dir, prompts, pm, speculator="tree_oracle", attention="torch")
    assert outs == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_triton_target_as_its_own_tree_draft_is_lossless(gpu_case):
    """Draft-model trees on CUDA: the draft's [n, m] masks and the target's tree verify run
    in the Triton extend kernel."""
    model_dir, prompts, plain = gpu_case
    options = {"draft": {"model_path": str(model_dir), "topk": 2, "num_steps": 3,
                         "num_draft_tokens": 5}}  # fmt: skip
    outs, stats = run(model_dir, prompts, speculator="draft", plugin_options=options)
    assert outs == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
