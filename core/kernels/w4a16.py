"""W4A16 matmul: `y = x @ W.T (+ bias)` with W stored as 4-bit values, activations bf16/fp16.

A decode step at small batch is bound by reading the weights; 4-bit weights are ~3.7x fewer
bytes than bf16 (group 128: 4 bits + 2 x 16 bits per 128 values). The weights come in the
serving layout of `pegboard.plugins.linear.int4` (packed at load): `qweight [K / 8, N]` int32,
eight input columns per word along K, N contiguous; `scales`, `offsets` `[K / group, N]`;
`w = q * scale + offset`, de-quantized in registers, in float32, rounded once to x's dtype.

Program `(m, n, s)` owns `BLOCK_M` rows of x and `BLOCK_N` output columns and walks the `s`-th
of `SPLIT_K` slices of K in `BLOCK_K` steps. Each step loads a `[BLOCK_K / 8, BLOCK_N]` tile of
words (16 bytes per thread along N, marked evict-first so the weights do not push x out of the
cache), its scales and offsets, unpacks it into a `[BLOCK_K, BLOCK_N]` tile, and multiplies:

- `DOT` (tensor cores, `tl.dot`) for more rows (GEMM, and decode batches above 4);
- otherwise (CUDA cores: float32 products summed over K in registers) for 1-4 rows, where
  padding x to the 16 rows a tensor-core tile needs would waste the multiply (GEMV).

With `SPLIT_K > 1` each program writes float32 partial sums and `gemv.split_k_sum` adds them
and the bias. With programmatic dependent launch (Hopper, `pdl`), a program issues its first
weight tile before it waits for the kernel that writes x. Loop bounds are `tl.constexpr`
(K is fixed per layer), so the kernels also run in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.gemv import split_k_sum
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs

GEMV_MAX_ROWS = 4


@dataclass(frozen=True)
class W4A16Config:
    """One launch configuration (see the module docstring)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = True


@triton.jit
def _weight_tile(qw_ptr, s_ptr, m_ptr, k, offs_n, n_mask, N, GROUP: tl.constexpr):
    """The de-quantized float32 `[BLOCK_K, BLOCK_N]` tile of input columns `k`."""
    words = tl.load(
        qw_ptr + (k // 8)[:, None] * N + offs_n[None, :],
        mask=n_mask[None, :],
        other=0,
        eviction_policy="evict_first",
    )
    q = (words >> ((k % 8) * 4)[:, None]) & 0xF
    g = (k // GROUP)[:, None] * N + offs_n[None, :]
    scale = tl.load(s_ptr + g, mask=n_mask[None, :], other=0.0).to(tl.float32)
    offset = tl.load(m_ptr + g, mask=n_mask[None, :], other=0.0).to(tl.float32)
    return q.to(tl.float32) * scale + offset


@triton.jit
def _store(
    y_ptr,
    b_ptr,
    acc,
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
    pid_s,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        ptrs = y_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym,
    K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m_mask = offs_m < M
    K_SPLIT: tl.constexpr = K // SPLIT_K
    k0 = pid_s * K_SPLIT + tl.arange(0, BLOCK_K)
    w = _weight_tile(qw_ptr, s_ptr, m_ptr, k0, offs_n, n_mask, N, GROUP)
    wait_for_inputs(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        k = k0 + i * BLOCK_K
        if i > 0:
            w = _weight_tile(qw_ptr, s_ptr, m_ptr, k, offs_n, n_mask, N, GROUP)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None], other=0.0
        )
        if DOT:  # tensor cores
            acc += tl.dot(x, w.to(x.dtype))
        else:  # CUDA cores; the weight rounded to x's dtype first, as the dot path does
            prod = x.to(tl.float32)[:, :, None] * w.to(x.dtype).to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=1)
    _store(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, pid_s, HAS_BIAS, SPLIT_K > 1)


def unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why the kernels cannot take a `[N, K]` layer with this group size (None if they can):
    K must be whole 32-column steps and groups whole words."""
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if group % 8:
        return f"group size {group} is not a multiple of 8"
    return None


def pick_config(m: int, n: int, k: int) -> W4A16Config:
    """A launch configuration for `m` rows of x and a `[N, K]` layer (untuned defaults; the
    H200 sweep of `scripts/bench_w4a16.py --sweep` is what should replace them)."""
    block_k = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    if m <= GEMV_MAX_ROWS:
        # The CUDA-core path holds a [rows, BLOCK_K, BLOCK_N] product tile in registers: keep
        # it near 64 float32 per thread (128 threads).
        block_m = triton.next_power_of_2(m)
        block_k = min(block_k, 64)
        block_n = 128 // block_m
        cfg = W4A16Config(block_m, block_n, block_k, num_stages=2)
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64 if m <= 64 else 128
        cfg = W4A16Config(block_m, block_n, block_k, num_stages=3)
    # Enough programs to keep ~132 SMs streaming: split K when the output is narrow.
    programs = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = 1
    while programs * split < 256 and k % (cfg.block_k * split * 2) == 0 and split < 16:
        split *= 2
    return W4A16Config(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for the packed W (see the module docstring): x `[..., K]`, a new
    `[..., N]` tensor in x's dtype. Never synchronises with the host (CUDA-graph safe)."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or pick_config(m, n, k)
    gemv = m <= GEMV_MAX_ROWS and cfg.block_m <= GEMV_MAX_ROWS
    split = cfg.split_k
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    pdl = launch_options(x.device) if cfg.pdl else {"PDL": False}
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _w4a16_kernel[grid](
        x2,
        qweight,
        scales,
        offsets,
        bias if bias is not None else out,
        partial,
        m,
        n,
        x2.stride(0),
        out.stride(0),
        K=k,
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT=not gemv,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
    )
    if split > 1:
        split_k_sum(partial, bias, out, pdl)
    return out.view(*x.shape[:-1], n)
