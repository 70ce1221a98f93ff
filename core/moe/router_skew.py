"""`--moe-router-skew S` (benchmarks): a Zipf-like expert load from random weights.

Each sparse layer's router logits get `-S * log(1 + rank)` over a random order of its experts
(seeded, so every tensor-parallel rank builds the same bias and routes alike)."""

from __future__ import annotations

import torch


def skew_router(blocks: list, strength: float, seed: int = 0) -> None:
    """Set `router_bias` on each `MoEBlock` of `blocks`."""
    gen = torch.Generator().manual_seed(seed)
    for block in blocks:
        rank = torch.randperm(block.gate.weight.shape[0], generator=gen).double()
        bias = -strength * torch.log1p(rank)
        block.router_bias = bias.to(block.experts.w13.device, torch.float32)
