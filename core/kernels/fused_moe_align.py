"""Grouping the (token, expert) pairs of a MoE layer by expert, in blocks of the GEMM's rows.

The grouped GEMMs of `fused_moe` give each program `BLOCK_M` rows that all use one expert's
weights. `align_pairs` (vLLM's `moe_align_block_size`, in PyTorch ops) sorts the pairs
`p = token * k + choice` by expert and pads each expert's run to a multiple of `block_m`:

- `sorted_pairs [capacity]` int32: pair ids, expert by expert; padding holds `num_pairs`;
- `block_experts [capacity // block_m]` int32: each block's expert, -1 for a block of pairs
  whose expert is not in `[0, num_experts)` (not held here: the kernels write zeros for them)
  and for blocks past the end;
- `padded_count [1]` int32: how many entries of `sorted_pairs` are used (the kernels skip
  blocks at or past it).

`capacity` depends only on the shapes (at most `num_pairs + min(E + 1, num_pairs) *
(block_m - 1)`, rounded up to a block), and nothing reads a count on the host, so a CUDA graph
can capture it.
"""

from __future__ import annotations

import torch


def capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Entries of `sorted_pairs`: enough for every expert's run padded to a block (only the
    experts that have pairs, at most `num_pairs` of them, plus the not-held bucket, pad)."""
    worst = num_pairs + min(num_experts + 1, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_ids [T, k]` (expert rows) -> `(sorted_pairs, block_experts, padded_count)`."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    held = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(held, flat, num_experts)  # the last bucket: experts not held here
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # bincount syncs on CUDA; this not
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[sorted_bucket]
    slots = capacity(n, num_experts, block_m)
    sorted_pairs = torch.full((slots,), n, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, (ends - padded)[sorted_bucket] + rank, order.int())
    block_starts = torch.arange(0, slots, block_m, device=device)
    block_bucket = torch.searchsorted(ends, block_starts, right=True)
    block_experts = torch.where(block_bucket < num_experts, block_bucket, -1).int()
    return sorted_pairs, block_experts, ends[-1:].int()
