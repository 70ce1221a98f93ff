"""The fused MoE Triton kernel (`pegboard.core.kernels.fused_moe`) against the PyTorch expert
path of `MoEExperts` (the reference) and a float64 oracle.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on tiny float32 shapes (the interpreter multiplies bf16 as integers inside
`tl.dot`): both pair layouts (direct, sorted), ragged K and N blocks, grouped row blocks,
experts not held (expert parallelism). The `gpu` tests run Qwen3-30B-A3B's expert shapes in
bf16 at decode and prefill sizes, and a CUDA graph capture.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels.fused_moe import (  # noqa: E402
    DIRECT_MAX_PAIRS,
    GemmConfig,
    MoEConfig,
    choose_config,
    fused_experts,
)
from pegboard.core.kernels.fused_moe_align import align_pairs  # noqa: E402
from pegboard.core.kernels.fused_moe_topk import softmax_topk  # noqa: E402
from pegboard.core.models.moe import MoEExperts  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = GemmConfig(16, 16, 16)  # several N and K blocks at the tiny shapes
DIRECT = MoEConfig(SMALL, GemmConfig(16, 32, 16), direct=True)
SORTED = MoEConfig(SMALL, GemmConfig(16, 32, 16))
GROUPED = MoEConfig(GemmConfig(32, 16, 32, group_m=2), GemmConfig(32, 16, 16, group_m=3))


def routed_case(tokens, top_k, experts, hidden, size, dtype=torch.float32, seed=0):
    """Activations, distinct top-k experts per token, normalised weights, expert weights."""
    gen = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    x = randn(tokens, hidden)
    scores = torch.rand(tokens, experts, generator=gen, device=DEVICE)
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=gen, device=DEVICE)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    w13 = randn(experts, 2 * size, hidden, scale=hidden**-0.5)
    w2 = randn(experts, hidden, size, scale=size**-0.5)
    return x, ids, weights, w13, w2


def torch_path(x, ids, weights, w13, w2, dtype=None):
    """`MoEExperts.forward` (the PyTorch reference), in `dtype` (default: the inputs')."""
    dtype = dtype or x.dtype
    experts = MoEExperts(w13.shape[0], x.shape[1], w2.shape[2], {}, "experts")
    experts.w13.data, experts.w2.data = w13.to(dtype), w2.to(dtype)
    return experts(x.to(dtype), ids, weights.to(dtype))


def relative_error(out, reference):
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


# ------------------------------------------------------------------ CPU interpreter, float32


@pytest.mark.parametrize(
    "tokens, top_k, experts, config",
    [
        (1, 4, 8, DIRECT),
        (5, 2, 6, DIRECT),
        (1, 4, 8, SORTED),
        (9, 2, 4, SORTED),
        (21, 3, 5, GROUPED),
        (13, 1, 3, None),  # choose_config's pick
    ],
    ids=["direct-bs1", "direct-bs5", "sorted-bs1", "sorted-bs9", "grouped-bs21", "auto-k1"],
)
def test_fused_experts_equal_the_torch_path(tokens, top_k, experts, config):
    # hidden 40 and intermediate 24 are no multiples of the blocks: ragged K and N tiles.
    case = routed_case(tokens, top_k, experts, hidden=40, size=24)
    out = fused_experts(*case, config=config)
    assert out.shape == (tokens, 40) and out.dtype == torch.float32
    reference = torch_path(*case, dtype=torch.float64)
    assert relative_error(out, reference) < 1e-5
    torch.testing.assert_close(out, torch_path(*case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [DIRECT, SORTED], ids=["direct", "sorted"])
def test_half_activations_with_float32_routing_weights_and_int32_ids(config):
    # Mixtral keeps its routing weights in float32; ids may come as int32 (expert parallelism).
    x, ids, weights, w13, w2 = routed_case(7, 2, 6, hidden=48, size=32, dtype=torch.float16)
    weights = weights.float()
    out = fused_experts(x, ids.int(), weights, w13, w2, config=config)
    assert out.dtype == torch.float16
    reference = torch_path(x, ids, weights, w13, w2, torch.float64)
    assert relative_error(out, reference) < 2e-3  # float16 rounding
    assert relative_error(out, reference) <= 2 * relative_error(
        torch_path(x, ids, weights, w13, w2), reference
    )


@pytest.mark.parametrize("config", [DIRECT, SORTED], ids=["direct", "sorted"])
def test_pairs_of_experts_not_held_add_nothing(config):
    x, ids, weights, w13, w2 = routed_case(6, 3, 5, hidden=32, size=16)
    ids[0, 1], ids[2, 0], ids[5, 2] = -1, 5, -1  # expert parallelism: not on this rank
    held = (ids >= 0) & (ids < 5)
    out = fused_experts(x, ids, weights, w13, w2, config=config)
    # The same pairs with weight 0 (any held expert) are the reference.
    dropped = torch_path(x, ids.where(held, 0), weights * held, w13, w2, torch.float64)
    assert relative_error(out, dropped) < 1e-5


def check_alignment(ids, experts, block_m):
    """`align_pairs`' contract: every pair once, each used block one expert's pairs (-1: not
    held), padding elsewhere; returns (block experts, sorted pairs) of the used blocks."""
    sorted_pairs, block_experts, padded = align_pairs(ids, experts, block_m)
    used, n, flat = int(padded.item()), ids.numel(), ids.reshape(-1)
    assert used % block_m == 0 and used <= sorted_pairs.numel()
    assert (sorted_pairs[used:] == n).all() and (block_experts[used // block_m :] == -1).all()
    real = sorted_pairs[sorted_pairs < n]
    assert sorted(real.tolist()) == list(range(n))  # each pair exactly once
    for block in range(used // block_m):
        pairs = sorted_pairs[block * block_m : (block + 1) * block_m]
        pairs = pairs[pairs < n].long()
        expert = int(block_experts[block])
        assert len(pairs) > 0
        if expert == -1:
            assert ((flat[pairs] < 0) | (flat[pairs] >= experts)).all()
        else:
            assert (flat[pairs] == expert).all()
    return block_experts[: used // block_m].tolist(), sorted_pairs[:used]


def test_align_pairs_groups_every_pair_once_by_expert_in_whole_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [7, 3], [3, -1], [0, 3]], device=DEVICE)
    blocks, pairs = check_alignment(ids, experts=4, block_m=4)
    # Expert 3 has five pairs: two blocks; the not-held block gathers ids 7 and -1.
    assert blocks == [0, 1, 3, 3, -1]
    assert sorted(pairs[8:13].tolist()) == [0, 2, 5, 6, 9]  # order within a run: arbitrary


def test_align_pairs_over_many_programs():
    gen = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(-1, 9, (300, 4), generator=gen, device=DEVICE)  # 1,200 pairs, some -1
    blocks, _ = check_alignment(ids, experts=8, block_m=16)
    assert sorted(set(blocks)) == list(range(-1, 8))


@pytest.mark.parametrize(
    "tokens, experts, top_k, renormalize, dtype",
    [
        (3, 8, 2, False, torch.float32),
        (5, 60, 3, True, torch.bfloat16),
        (2, 128, 8, True, torch.float32),
    ],
)
def test_router_softmax_topk_equals_the_torch_ops(tokens, experts, top_k, renormalize, dtype):
    gen = torch.Generator(DEVICE).manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen, device=DEVICE).to(dtype)
    weights, ids = softmax_topk(logits, top_k, renormalize, dtype)
    # MoEBlock.route's PyTorch ops
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    expected_weights, _ = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    # The k largest probabilities, descending; among equal ones (bf16 logits tie) any expert.
    assert all(len(set(row)) == top_k for row in ids.tolist())
    torch.testing.assert_close(probs.gather(1, ids), torch.topk(probs, top_k).values)
    torch.testing.assert_close(weights, expected_weights.to(dtype))  # to rounding of dtype


def test_router_ranks_nan_first_as_torch_topk_so_experts_stay_in_range():
    # A padded row of a decode CUDA graph has no keys: its attention is 0 / 0, its router
    # logits NaN (or +-inf). Expert id E there indexed past the placement table on the GPU.
    gen = torch.Generator(DEVICE).manual_seed(0)
    logits = torch.randn(4, 128, generator=gen, device=DEVICE)
    logits[1], logits[2, 5], logits[3] = float("nan"), float("inf"), float("-inf")
    weights, ids = softmax_topk(logits, 8, True, torch.float32)
    assert ((ids >= 0) & (ids < 128)).all() and all(len(set(r)) == 8 for r in ids.tolist())
    assert weights[1:].isnan().all()  # as torch's softmax and topk give
    assert torch.equal(ids[0], torch.softmax(logits[0], -1).topk(8).indices)


def test_align_pairs_at_the_engine_token_budget():
    # 8,192 tokens a step (--max-num-batched-tokens) x top-8 of 128 experts: 65,536 pairs,
    # the largest blocks; and the few-pairs case of the same config table.
    gen = torch.Generator(DEVICE).manual_seed(0)
    for tokens in (8192, 7):
        ids = torch.rand(tokens, 128, generator=gen, device=DEVICE).topk(8, dim=-1).indices
        block_m = choose_config(tokens, 8, 128).gate_up.block_m
        blocks, _ = check_alignment(ids, experts=128, block_m=block_m)
        assert sorted(set(blocks)) == sorted(set(ids.reshape(-1).tolist()))


@pytest.mark.slow
def test_fused_experts_at_the_engine_token_budget():
    # Qwen3-30B-A3B's routing (E=128, k=8) at 8,192 tokens, tiny H and I (interpreter: ~2 min).
    case = routed_case(8192, 8, 128, hidden=24, size=16)
    out = fused_experts(*case)
    assert relative_error(out, torch_path(*case, dtype=torch.float64)) < 1e-5


def test_decode_pairs_skip_sorting_and_larger_batches_get_larger_blocks():
    assert choose_config(1, 8, 128).direct
    assert choose_config(DIRECT_MAX_PAIRS // 8, 8, 128).direct
    assert choose_config(1, 2, 8).direct and not choose_config(2, 2, 8).direct  # few experts
    sizes = [choose_config(t, 8, 128) for t in (8, 64, 256, 2048, 16384)]
    assert not any(c.direct for c in sizes)
    blocks = [c.gate_up.block_m for c in sizes]
    assert blocks == sorted(blocks) and blocks[0] == 16 and blocks[-1] >= 64
    assert all(c.gate_up.block_m == c.down.block_m for c in sizes)


def test_no_tokens_and_mismatched_weights():
    x, ids, weights, w13, w2 = routed_case(3, 2, 4, hidden=32, size=16)
    assert fused_experts(x[:0], ids[:0], weights[:0], w13, w2).shape == (0, 32)
    with pytest.raises(ValueError, match="do not fit"):
        fused_experts(x, ids, weights, w13, w2[:, :16])


# ------------------------------------------------------------------ GPU, bf16, real shapes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QWEN3_30B = dict(top_k=8, experts=128, hidden=2048, size=768)  # Qwen3-30B-A3B's experts


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 3, 8, 64, 256, 2048, 8192])
def test_qwen3_30b_experts_in_bf16_are_as_close_as_the_torch_path(tokens):
    case = routed_case(tokens, dtype=torch.bfloat16, **QWEN3_30B)
    out = fused_experts(*case)
    oracle = torch_path(*case, dtype=torch.float64)
    torch_error = relative_error(torch_path(*case), oracle)
    error = relative_error(out, oracle)
    assert error < 1e-2 and error <= 1.5 * torch_error + 1e-3, (error, torch_error)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [2, 96])
def test_a_cuda_graph_replays_the_fused_experts_with_new_routing(tokens):
    x, ids, weights, w13, w2 = routed_case(tokens, dtype=torch.bfloat16, **QWEN3_30B)
    fused_experts(x, ids, weights, w13, w2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, ids, weights, w13, w2)
    new = routed_case(tokens, dtype=torch.bfloat16, seed=1, **QWEN3_30B)
    for static, fresh in zip((x, ids, weights), new[:3]):
        static.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(out, fused_experts(*new[:3], w13, w2))
