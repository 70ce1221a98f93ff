"""MoE models (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert) reproduce transformers in
float32 on CPU: teacher-forced logits through our paged decoder, and greedy generation through
the engine with batching, chunked prefill and preemption. Redundant expert replicas and any
placement leave the outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from fixtures import PageAllocator
from fixtures.tiny_moe import MOE_ARCHS, build_tiny_moe
from pegboard.core.models.moe import moe_blocks
from pegboard.core.moe.apply import apply_placement
from pegboard.sdk.expert_placement import ExpertPlacement
from pegboard.sdk.types import Request
from test_engine_parity import assert_same_tokens, hf_reference, make_prompts, run_pegboard
from test_models import ATOL, NUM_PAGES, hf_logits, make_runner, random_sequences, run_step


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dir(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def moe_case(moe_dir):
    from transformers import AutoConfig

    prompts = make_prompts(AutoConfig.from_pretrained(moe_dir).vocab_size)
    return moe_dir, prompts, hf_reference(moe_dir, prompts, 12)


def test_layers_are_sparse_where_the_config_says(moe_dir):
    runner, _ = make_runner(moe_dir, page_size=16)
    blocks = moe_blocks(runner.model)
    cfg = runner.model.config.moe
    expected = [i for i in range(runner.model.config.num_layers) if cfg.is_sparse(i)]
    assert [b.layer for b in blocks] == expected
    assert [b.moe_index for b in blocks] == list(range(len(expected)))
    assert (blocks[0].shared_expert is not None) == (cfg.shared_expert_size > 0)


def test_teacher_forced_logits_match_transformers(moe_dir):
    prompt_lens, decode_steps = [5, 17, 33, 1], 4
    sequences = random_sequences([n + decode_steps for n in prompt_lens], seed=1)
    reference = hf_logits(moe_dir, sequences)
    runner, alloc = make_runner(moe_dir, page_size=4)
    requests = [Request(prompt_token_ids=seq[:n]) for seq, n in zip(sequences, prompt_lens)]
    logits = run_step(runner, alloc, [(r, r.num_tokens) for r in requests])
    for i, n in enumerate(prompt_lens):
        torch.testing.assert_close(logits[i], reference[i][n - 1], atol=ATOL, rtol=0)
    for step in range(decode_steps - 1):
        for r, seq in zip(requests, sequences):
            r.append_token(seq[r.num_tokens])
        logits = run_step(runner, alloc, [(r, 1) for r in requests])
        for i, n in enumerate(prompt_lens):
            torch.testing.assert_close(logits[i], reference[i][n + step], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="batched"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
    ],
)
def test_greedy_equals_transformers(moe_case, settings):
    model_dir, prompts, reference = moe_case
    assert_same_tokens(run_pegboard(model_dir, prompts, **settings), reference)


def test_greedy_equals_transformers_under_preemption(moe_case):
    model_dir, prompts, reference = moe_case
    outs = run_pegboard(model_dir, prompts, page_size=4, kv_cache_tokens=64)
    assert sum(o.num_preemptions for o in outs) > 0, "the KV cache was not small enough"
    assert_same_tokens(outs, reference)


def test_redundant_replicas_and_a_shuffled_placement_change_nothing(moe_dir):
    """Move to a placement with 3 redundant slots per layer (experts 0 and 1 replicated, all
    shuffled): the weights move with it and the logits stay the same."""
    sequences = random_sequences([9, 21], seed=3)
    runner, alloc = make_runner(moe_dir, page_size=4)
    before = run_step(runner, alloc, [(r, r.num_tokens) for r in map(_request, sequences)])
    blocks = moe_blocks(runner.model)
    experts = blocks[0].placement.num_logical
    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.cat([torch.randperm(experts, generator=gen), torch.tensor([0, 0, 1])]) for _ in blocks
    ]
    apply_placement(runner.model, ExpertPlacement(torch.stack(rows), experts))
    assert all(b.experts.w13.shape[0] == experts + 3 for b in blocks)
    assert all(int(b.placement.replica_count[0, 0]) == 3 for b in blocks)
    fresh = PageAllocator(NUM_PAGES, alloc.page_size)
    after = run_step(runner, fresh, [(r, r.num_tokens) for r in map(_request, sequences)])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def _request(tokens: list[int]) -> Request:
    return Request(prompt_token_ids=tokens)


def test_gathered_decode_path_equals_the_sorted_path():
    """Few (token, expert) pairs take the gathered, sync-free path; it equals the sorted one."""
    from pegboard.core.models import moe

    experts = moe.MoEExperts(6, 16, 8, {"gate": "g", "up": "u", "down": "d"}, "e")
    gen = torch.Generator().manual_seed(0)
    experts.w13.data = torch.randn(6, 16, 16, generator=gen)
    experts.w2.data = torch.randn(6, 16, 8, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    slots = torch.randint(0, 6, (5, 2), generator=gen)
    weights = torch.rand(5, 2, generator=gen)
    assert slots.numel() <= moe.GATHER_MAX_PAIRS
    gathered = experts(x, slots, weights)
    original = moe.GATHER_MAX_PAIRS
    try:
        moe.GATHER_MAX_PAIRS = 0
        sorted_path = experts(x, slots, weights)
    finally:
        moe.GATHER_MAX_PAIRS = original
    torch.testing.assert_close(gathered, sorted_path, atol=1e-5, rtol=1e-5)
