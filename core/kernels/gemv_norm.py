"""The residual add and RMSNorm inside the GEMV that follows them (`PEGBOARD_FUSED_NORM_GEMV`).

At batch 1 every decoder layer runs `hidden, residual = norm(hidden, residual)` twice, each a
kernel of ~1.7 µs whose output only the next GEMV (qkv, gate/up) reads: on the step's chain
of dependent kernels each costs its run and a hand-over (~2.4 µs per norm at batch 64 on the
H200, `scripts/trace_chain.py`, session 21), ~64 a step for Llama-3.1-8B. Every GEMV program
reads the whole row of x anyway, so it can do the norm's work as it walks K:

    h = x + residual                       (rounded to the activation dtype, as the add is)
    y[n] = rsqrt(mean(h²) + eps) * Σ_k W[n, k] * (h[k] * w_norm[k])

accumulating `h²` beside the products and scaling once at the end. Program 0 also stores `h`,
the new residual stream. The result equals `linear(rms_norm(x, w_norm, eps, residual))` up to
float rounding, not bit for bit: the norm's output is never rounded to the activation dtype
here (in bf16 the unfused path rounds it twice, after the scaling and after the weight), and
the sum of squares is added in another order. Element-wise kernel, one K slice (every program
needs all of K for the mean), up to `gemv.MAX_ROWS` rows; `dense.norm_linear` decides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.gemv import GemvConfig, _store_rows, _weight_tile, _x_tile
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs


@triton.jit
def _norm_step(x_ptrs, r_ptrs, s_ptrs, n_ptrs, w, k_offs, K, m_mask, store, EVEN_K: tl.constexpr):
    """One K block: the rounded sum `h` (stored by program 0: `store`), `h * w_norm * w` and
    `h²`."""
    x = _x_tile(x_ptrs, k_offs, K, m_mask, EVEN_K)
    r = _x_tile(r_ptrs, k_offs, K, m_mask, EVEN_K)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    if store:
        tl.store(s_ptrs, h, mask=m_mask & (k_offs < K))
    hf = h.to(tl.float32)
    nw = tl.load(n_ptrs, mask=k_offs < K, other=0.0).to(tl.float32)
    return (hf * nw) * w.to(tl.float32), hf * hf


@triton.jit
def _norm_gemv_kernel(
    X,
    Res,
    NormW,
    NewRes,
    W,
    Bias,
    Out,
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_rm,
    stride_sm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # (rows past N: read, not stored)
    k_offs = tl.arange(0, BLOCK_K)[None, None, :]
    w_ptrs = W + rows[None, :, None] * K + k_offs
    x_ptrs = X + offs_m[:, None, None] * stride_xm + k_offs
    r_ptrs = Res + offs_m[:, None, None] * stride_rm + k_offs
    s_ptrs = NewRes + offs_m[:, None, None] * stride_sm + k_offs
    n_ptrs = NormW + k_offs
    m_mask = offs_m[:, None, None] < M
    store = pid_n == 0  # one program writes the new residual
    w = _weight_tile(w_ptrs, k_offs, K, EVEN_K)  # (loading while the kernel before finishes)
    wait_for_inputs(PDL)
    acc, ss = _norm_step(x_ptrs, r_ptrs, s_ptrs, n_ptrs, w, k_offs, K, m_mask, store, EVEN_K)
    for k in range(BLOCK_K, K, BLOCK_K):
        w = _weight_tile(w_ptrs + k, k_offs + k, K, EVEN_K)
        a, s = _norm_step(
            x_ptrs + k, r_ptrs + k, s_ptrs + k, n_ptrs + k, w, k_offs + k, K, m_mask, store, EVEN_K
        )
        acc += a
        ss += s
    scale = 1.0 / tl.sqrt(tl.sum(ss, axis=2) / K + eps)  # [BLOCK_M, 1]
    _store_rows(
        tl.sum(acc, axis=2) * scale, offs_m, offs_n, 0, M, N, Bias, Out, Out, stride_om,
        HAS_BIAS, False,
    )  # fmt: skip


def norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(linear(normed, weight, bias), x + residual)` where `normed, _ = rms_norm(x,
    norm_weight, eps, residual)`, in one launch (see the module docstring). x and residual
    `[M, K]` (M up to `gemv.MAX_ROWS`) of one dtype, weight `[N, K]` contiguous; `config`
    element-wise and unsplit (else ValueError)."""
    if config.dot or config.split_k > 1:
        raise ValueError(f"norm_gemv needs an element-wise, unsplit config, not {config}")
    n, k = weight.shape
    if x.shape != residual.shape or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"norm_gemv: x {tuple(x.shape)} and residual {tuple(residual.shape)} "
                         f"must be [M, {k}]")  # fmt: skip
    if not weight.is_contiguous() or x.stride(1) != 1 or residual.stride(1) != 1:
        raise ValueError("norm_gemv needs a contiguous weight and unit strides along K")
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x)
    if m == 0:
        return out, new_residual
    block_k = min(config.block_k, triton.next_power_of_2(k))
    pdl = launch_options(x.device) if config.pdl else {"PDL": False}
    _norm_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, residual, norm_weight, new_residual, weight, bias if bias is not None else out, out,
        m, n, k, eps, x.stride(0), residual.stride(0), new_residual.stride(0), out.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl,
    )  # fmt: skip
    return out, new_residual
