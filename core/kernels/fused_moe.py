"""Fused mixture-of-experts: the routed experts of one layer as two grouped GEMMs in Triton.

`fused_experts(hidden [T, H], topk_ids [T, k], topk_weights [T, k], w13 [E, 2I, H],
w2 [E, H, I]) -> [T, H]` computes what the PyTorch path (`MoEExperts.forward`,
`pegboard.core.models.moe`) computes: for every (token, expert) pair `p = t * k + j`,
`w2[e] @ (silu(g) * u)` with `[g; u] = w13[e] @ hidden[t]`, times the routing weight, summed
over the `k` choices of each token. `topk_ids` are rows of `w13`/`w2` (physical slots; a
replica is just another row); an id outside `[0, E)` is an expert this caller does not hold
(expert parallelism) and contributes zero.

Two launches of one kernel (vLLM's / SGLang's `fused_moe` scheme), then a sum over `k`:

1. gate/up: program `(m, n)` takes a block of `BLOCK_M` pairs of one expert and `BLOCK_N`
   columns of the intermediate size, accumulates gate and up tiles in float32 (`tl.dot`) over
   H, and stores `silu(g) * u` rounded to the activation dtype into `act [T*k, I]`;
2. down: the same over `act`'s rows with `w2`, the float32 result times the pair's routing
   weight, rounded into `out [T*k, H]`;
3. `out.view(T, k, H).sum(1)` (float32 sum, one rounding, as the PyTorch path).

Pairs reach the kernel in one of two layouts:

- direct (decode: at most `DIRECT_MAX_PAIRS` pairs, and few per expert): block `m` is pair
  `m` alone, its expert read from `topk_ids`; no sorting at all, each pair streams its
  expert's weights (at batch 1 the k experts are distinct anyway), and the tensor cores' 16
  rows are mostly padding, which costs nothing in a pass bound by reading weights;
- sorted (`fused_moe_align.align_pairs`): pairs grouped by expert in blocks of `BLOCK_M`, so
  each expert's weights are read once per block of its tokens.

Launch configurations come from `CONFIGS`, keyed on pairs per expert (`T * k / E`); they were
chosen from vLLM's H200 table for E=128, I=768 (Qwen3-30B-A3B), not measured here yet
(`scripts/bench_moe.py --sweep` measures the candidates). Nothing synchronises with the host
and the grid depends only on the shapes, so a CUDA graph can capture a call once each
configuration has been compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.fused_moe_align import align_pairs

DIRECT_MAX_PAIRS = 32  # up to here pairs are not sorted (a repeated expert is read again)


@dataclass(frozen=True)
class GemmConfig:
    """Rows (pairs), output columns and K per program step; `group_m` row blocks share their
    column sweep (L2 reuse of the activations); Triton's warps and pipelining depth."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """One call's launch plan: the pair layout and each GEMM's configuration."""

    gate_up: GemmConfig
    down: GemmConfig
    direct: bool = False


_DECODE_UP, _DECODE_DOWN = GemmConfig(16, 32, 128, num_stages=4), GemmConfig(16, 64, 128, 1, 4, 4)

#: (largest pairs per expert, config), first match wins.
CONFIGS: list[tuple[float, MoEConfig]] = [
    (0.5, MoEConfig(_DECODE_UP, _DECODE_DOWN)),
    (4, MoEConfig(GemmConfig(16, 64, 128), GemmConfig(16, 128, 128))),
    (24, MoEConfig(GemmConfig(32, 64, 128, 16), GemmConfig(32, 128, 128, 16))),
    (96, MoEConfig(GemmConfig(64, 64, 64), GemmConfig(64, 128, 64))),
    (
        float("inf"),
        MoEConfig(GemmConfig(128, 64, 64, 16, 8, 4), GemmConfig(128, 128, 64, 16, 8, 4)),
    ),
]


def choose_config(num_tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """The launch plan for `num_tokens` tokens routed to `top_k` of `num_experts` experts."""
    # Direct while few pairs share an expert: with E / 4 pairs or fewer most experts are
    # distinct; a single token's k experts always are.
    if num_tokens * top_k <= min(DIRECT_MAX_PAIRS, max(top_k, num_experts // 4)):
        return MoEConfig(_DECODE_UP, _DECODE_DOWN, direct=True)
    per_expert = num_tokens * top_k / max(num_experts, 1)
    return next(config for limit, config in CONFIGS if per_expert <= limit)


# The pair count changes with every batch size: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_kernel(
    A,
    W,
    Out,
    RoutingWeights,
    TopkIds,
    SortedPairs,
    BlockExperts,
    PaddedCount,
    num_pairs,
    num_experts,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    PAIRS_PER_ROW: tl.constexpr,  # pair p reads row p // PAIRS_PER_ROW of A
    GATE_UP: tl.constexpr,  # W holds gate rows [0, N) and up rows [N, 2N): store silu(g) * u
    ROUTED_WEIGHT: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    rows = tl.arange(0, BLOCK_M)
    if DIRECT:
        pairs = tl.where(rows == 0, pid_m, num_pairs)
        expert = tl.load(TopkIds + pid_m).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(PaddedCount):
            return
        pairs = tl.load(SortedPairs + pid_m * BLOCK_M + rows)
        expert = tl.load(BlockExperts + pid_m).to(tl.int64)
    pair_mask = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = Out + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = pair_mask[:, None] & (offs_n[None, :] < N)
    if (expert < 0) | (expert >= num_experts):  # not held here: contributes zero
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), Out.dtype.element_ty), mask=out_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // PAIRS_PER_ROW).to(tl.int64)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
    # Columns past N read row N - 1 (their results are not stored): no mask on N.
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_ptrs = W + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATE_UP:
            u = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if ROUTED_WEIGHT:
        weight = tl.load(RoutingWeights + pairs, mask=pair_mask, other=0.0)
        acc = acc * weight.to(tl.float32)[:, None]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=out_mask)


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    n: int,
    routing: torch.Tensor | None,
    layout: tuple,
    cfg: GemmConfig,
    direct: bool,
    pairs_per_row: int,
    gate_up: bool,
) -> None:
    topk_ids, sorted_pairs, block_experts, padded_count = layout
    num_pairs = topk_ids.numel()
    blocks = num_pairs if direct else block_experts.numel()
    grid = (blocks * triton.cdiv(n, cfg.block_n),)
    _expert_gemm_kernel[grid](
        a,
        w,
        out,
        routing if routing is not None else out,
        topk_ids,
        sorted_pairs,
        block_experts,
        padded_count,
        num_pairs,
        w.shape[0],
        n,
        a.shape[1],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        PAIRS_PER_ROW=pairs_per_row,
        GATE_UP=gate_up,
        ROUTED_WEIGHT=routing is not None,
        DIRECT=direct,
        BLOCK_M=16 if direct else cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=1 if direct else cfg.group_m,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        # float32 tiles take twice the shared memory of the bf16 ones the stages were set for
        num_stages=cfg.num_stages if a.element_size() < 4 else min(cfg.num_stages, 2),
    )


def fused_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """`hidden [T, H]`, `topk_ids [T, k]` (rows of the weights; outside `[0, E)`: not held,
    zero), `topk_weights [T, k]`, `w13 [E, 2I, H]`, `w2 [E, H, I]` -> `[T, H]` in
    `hidden`'s dtype. `config` overrides `choose_config` (tests, benchmarks)."""
    tokens, top_k = topk_ids.shape
    experts, size = w13.shape[0], w2.shape[2]
    if w13.shape != (experts, 2 * size, hidden.shape[1]) or w2.shape != (
        experts,
        hidden.shape[1],
        size,
    ):
        raise ValueError(
            f"fused_experts: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit "
            f"hidden {tuple(hidden.shape)}"
        )
    if tokens == 0:
        return hidden.new_zeros(hidden.shape)
    config = config or choose_config(tokens, top_k, experts)
    hidden = hidden.contiguous()
    ids = topk_ids.contiguous()
    if config.direct:
        layout = (ids, ids, ids, ids)  # the sorted-layout arguments are not read
    else:
        if config.gate_up.block_m != config.down.block_m:
            raise ValueError("fused_experts: both GEMMs of the sorted layout need one block_m")
        layout = (ids, *align_pairs(ids, experts, config.gate_up.block_m))
    pairs = tokens * top_k
    act = torch.empty(pairs, size, dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, w13, act, size, None, layout, config.gate_up, config.direct, top_k, True)
    out = torch.empty(pairs, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.contiguous()
    _launch(act, w2, out, hidden.shape[1], weights, layout, config.down, config.direct, 1, False)
    return out.view(tokens, top_k, -1).sum(dim=1)
