"""Grouping the (token, expert) pairs of a MoE layer by expert, in blocks of the GEMM's rows.

The grouped GEMMs of `fused_moe` give each program `BLOCK_M` rows that all use one expert's
weights. `align_pairs` (vLLM's `moe_align_block_size`) groups the pairs
`p = token * k + choice` by expert and pads each expert's run to a multiple of `block_m`:

- `sorted_pairs [capacity]` int32: pair ids, expert by expert; padding holds `num_pairs`;
- `block_experts [capacity // block_m]` int32: each block's expert, -1 for a block of pairs
  whose expert is not in `[0, num_experts)` (not held here: the kernels write zeros for them)
  and for blocks past the end;
- `padded_count [1]` int32: how many entries of `sorted_pairs` are used (the kernels skip
  blocks at or past it).

Three small Triton kernels (a memset and three launches in all, where PyTorch ops took about
thirty): count the pairs per expert with atomics (and fill `sorted_pairs` with padding), one
program turning the counts into padded runs (a prefix sum) and each block's expert, then each
pair takes the next free place of its expert's run with an atomic increment. The order of the
pairs within a run is therefore arbitrary; the GEMMs compute every row on its own, so it does
not change any result. `capacity` depends only on the shapes (at most `num_pairs +
min(E + 1, num_pairs) * (block_m - 1)`, rounded up to a block) and nothing reads a count on
the host, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # pairs (or padding entries) per program of the count and place kernels
BLOCKS_PER_STEP = 32  # blocks whose expert the layout kernel finds at a time


def capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Entries of `sorted_pairs`: enough for every expert's run padded to a block (only the
    experts that have pairs, at most `num_pairs` of them, plus the not-held bucket, pad)."""
    worst = num_pairs + min(num_experts + 1, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


@triton.jit
def _bucket(Ids, offs, num_pairs, num_experts):
    """The bucket of each pair: its expert, or `num_experts` for an expert not held here."""
    ids = tl.load(Ids + offs, mask=offs < num_pairs, other=-1)
    return tl.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)


@triton.jit(do_not_specialize=["num_pairs", "slots"])
def _count_kernel(Ids, Counts, SortedPairs, num_pairs, num_experts, slots, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(SortedPairs + offs, tl.zeros((BLOCK,), tl.int32) + num_pairs, mask=offs < slots)
    bucket = _bucket(Ids, offs, num_pairs, num_experts)
    tl.atomic_add(Counts + bucket, 1, mask=offs < num_pairs)


@triton.jit(do_not_specialize=["num_blocks"])
def _layout_kernel(
    Counts,
    Cursor,
    BlockExperts,
    PaddedCount,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    bins = tl.arange(0, BINS)
    held = bins <= num_experts  # the experts and the not-held bucket
    counts = tl.load(Counts + bins, mask=held, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(Cursor + bins, ends - padded, mask=held)  # each run's first place
    tl.store(PaddedCount, tl.sum(padded, 0))
    for first in range(0, num_blocks, BLOCKS_PER_STEP):
        blocks = first + tl.arange(0, BLOCKS_PER_STEP)
        # A block's run is the first whose end is past the block's start.
        before = ends[None, :] <= (blocks * BLOCK_M)[:, None]
        expert = tl.sum(before.to(tl.int32), 1)
        expert = tl.where(expert < num_experts, expert, -1)
        tl.store(BlockExperts + blocks, expert, mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["num_pairs"])
def _place_kernel(Ids, Cursor, SortedPairs, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    bucket = _bucket(Ids, offs, num_pairs, num_experts)
    place = tl.atomic_add(Cursor + bucket, 1, mask=mask)
    tl.store(SortedPairs + place, offs, mask=mask)


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_ids [T, k]` (expert rows, contiguous) -> `(sorted_pairs, block_experts,
    padded_count)`."""
    device = topk_ids.device
    n = topk_ids.numel()
    slots = capacity(n, num_experts, block_m)
    counters = torch.zeros(2, num_experts + 1, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(slots, dtype=torch.int32, device=device)
    block_experts = torch.empty(slots // block_m, dtype=torch.int32, device=device)
    padded_count = torch.empty(1, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    _count_kernel[(triton.cdiv(slots, BLOCK),)](
        ids, counters[0], sorted_pairs, n, num_experts, slots, BLOCK=BLOCK
    )
    _layout_kernel[(1,)](
        counters[0],
        counters[1],
        block_experts,
        padded_count,
        num_experts,
        block_experts.numel(),
        BLOCK_M=block_m,
        BINS=triton.next_power_of_2(num_experts + 1),
        BLOCKS_PER_STEP=BLOCKS_PER_STEP,
    )
    _place_kernel[(triton.cdiv(n, BLOCK),)](
        ids, counters[1], sorted_pairs, n, num_experts, BLOCK=BLOCK
    )
    return sorted_pairs, block_experts, padded_count
