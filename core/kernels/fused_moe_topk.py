"""A MoE router's softmax and top-k in one kernel: `softmax(logits) -> top k -> renormalise ->
cast`, as transformers computes it (`MoEBlock.route`'s PyTorch ops, about five kernels).

Program `t` reads token t's router logits `[E]` in float32, takes the softmax (max-subtracted
exp, divided by the sum), then picks the k largest probabilities one at a time (the lowest
expert index among equal ones), in descending order as `torch.topk` returns them, divides them
by their sum when `renormalize`, and stores the weights in `dtype` and the experts as int64.
At batch-1 decode a sparse layer's routing is a chain of tiny kernels; this makes it one.

A NaN probability ranks above every number, as in `torch.topk`, so the experts are always in
`[0, E)` and the weights NaN: a row of NaN logits is a padded row of a decode CUDA graph (its
attention has no keys: 0 / 0), and an expert id of E there indexed past the placement's
`logical_to_physical` table (a device-side assert that killed a 256-sequence run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_topk_kernel(
    Logits,
    Weights,
    Experts,
    num_experts,
    stride_l,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E_POW2)
    mask = cols < num_experts
    x = tl.load(Logits + row * stride_l + cols, mask=mask, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = tl.where(mask, p, 0.0)
    p = p / tl.sum(p, 0)
    # Probabilities are in [0, 1]: -1 marks taken or padding, 2 a NaN (ranked first).
    left = tl.where(mask, tl.where(p == p, p, 2.0), -1.0)
    ks = tl.arange(0, K_POW2)
    weights = tl.zeros((K_POW2,), tl.float32)
    experts = tl.zeros((K_POW2,), tl.int32)
    for j in tl.static_range(K):
        best = tl.max(left, 0)
        expert = tl.min(tl.where(left == best, cols, E_POW2), 0)
        weights = tl.where(ks == j, tl.where(best > 1.5, float("nan"), best), weights)
        experts = tl.where(ks == j, expert, experts)
        left = tl.where(cols == expert, -1.0, left)
    if RENORMALIZE:
        weights = weights / tl.sum(tl.where(ks < K, weights, 0.0), 0)
    out = row * K + ks
    tl.store(Weights + out, weights.to(Weights.dtype.element_ty), mask=ks < K)
    tl.store(Experts + out, experts.to(tl.int64), mask=ks < K)


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits [T, E]` -> `(weights [T, k] in dtype, experts [T, k] int64)`."""
    tokens, experts = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _softmax_topk_kernel[(tokens,)](
            logits,
            weights,
            ids,
            experts,
            logits.stride(0),
            K=top_k,
            K_POW2=triton.next_power_of_2(top_k),
            E_POW2=triton.next_power_of_2(experts),
            RENORMALIZE=renormalize,
            num_warps=1 if experts <= 256 else 4,
        )
    return weights, ids
