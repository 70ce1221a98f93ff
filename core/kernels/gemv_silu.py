"""SiLU-and-mul in the gate/up GEMV's epilogue: a program multiplies gate rows and the matching
up rows and writes `silu(gate) * up` for them, so no separate SiLU-and-mul launch follows.

In this mode (`gemv.gemv(..., silu_out=True)`, element-wise kernel, one K slice) program `n`
of the `[2 * I, K]` gate/up weight owns the `BLOCK_N / 2` gate rows `j = n * BLOCK_N / 2 + i`
and the up rows `I + j`: the same `[rows, BLOCK_N, BLOCK_K]` tile as the plain GEMV, only its
rows come from both halves, so each row's sums are the plain GEMV's. The epilogue rounds them
to the activation dtype (the gate/up output), then computes SiLU in float32, rounds it, and
rounds the product, as `activation.silu_and_mul` does: the `[rows, I]` result equals
`silu_and_mul(gemv(x, W))` bit for bit, without the weights being reordered (unlike
interleaving gate and up rows at load time) and without recomputing SiLU (unlike computing it
in the down projection, `PEGBOARD_FUSED_SILU_DOWN`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu_mul(gate, up):
    """`silu(gate) * up` of activation-dtype tiles, rounded as `activation.silu_and_mul` rounds
    (SiLU in float32 rounded to the activation dtype, the product rounded again)."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def paired_rows(pid_n, N, BLOCK_N: tl.constexpr):
    """Weight rows of program `pid_n`: `BLOCK_N / 2` gate rows, then the same up rows (`N / 2`
    further); columns past `N / 2` read the last one (their results are not stored)."""
    half = N // 2
    offs = tl.arange(0, BLOCK_N)
    cols = pid_n * (BLOCK_N // 2) + offs % (BLOCK_N // 2)
    return tl.minimum(cols, half - 1) + tl.where(offs >= BLOCK_N // 2, half, 0)


@triton.jit
def store_silu(
    acc,
    offs_m,
    pid_n,
    M,
    N,
    Bias,
    Out,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Store `silu(gate) * up` for `acc [BLOCK_M, BLOCK_N]` (float32 sums of `paired_rows`),
    each rounded first as the gate/up output would be (bias added before)."""
    if HAS_BIAS:
        acc += tl.load(Bias + paired_rows(pid_n, N, BLOCK_N)).to(tl.float32)[None, :]
    y = acc.to(Out.dtype.element_ty)
    gate, up = tl.split(tl.permute(tl.reshape(y, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))
    cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = (offs_m[:, None] < M) & (cols[None, :] < N // 2)
    tl.store(Out + offs_m[:, None] * stride_om + cols[None, :], silu_mul(gate, up), mask=mask)
