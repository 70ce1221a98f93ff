"""RMSNorm, alone or fused with the residual add before it (one read of each input row).

One program per row holds the whole row in registers: it adds the residual (rounded to the
activation dtype, as `x + residual` in PyTorch is) and stores that sum, then normalises in
float32, casts to the activation dtype and scales by the weight, as HF's `LlamaRMSNorm` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Weight,
    Out,
    ResidualOut,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < size
    wait_for_inputs(PDL)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ResidualOut.dtype.element_ty)
        tl.store(ResidualOut + row * stride_ro + offs, x, mask=mask)
    store_normalised(x, Weight, Out + row * stride_o, offs, mask, size, eps)


@triton.jit
def store_normalised(x, Weight, Out, offs, mask, size, eps):
    """Store `weight * normalise(x)` for the row `x` (in the activation dtype) at `Out + offs`:
    float32 statistics, cast to Out's dtype, then scaled (HF's `LlamaRMSNorm`). Shared with
    the fused all-reduce (`allreduce_norm`), so both compute the same bits."""
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / size
    h = (h * tl.math.rsqrt(variance + eps)).to(Out.dtype.element_ty)
    w = tl.load(Weight + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(Out + offs, y.to(Out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * normalise(x)` over the last dimension, in `x`'s dtype; with `residual`,
    `(weight * normalise(x + residual), x + residual)`. Inputs are `[..., size]` with a
    contiguous last dimension; the outputs are new contiguous tensors."""
    size = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty(rows, size, dtype=x.dtype, device=x.device)
    new_residual = r2 = None
    if residual is not None:
        r2 = _rows(residual)
        new_residual = torch.empty_like(out)
    if rows:
        block = triton.next_power_of_2(size)
        _rms_norm_kernel[(rows,)](
            x2,
            r2 if r2 is not None else x2,
            weight,
            out,
            new_residual if new_residual is not None else out,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            out.stride(0),
            size,
            eps,
            HAS_RESIDUAL=r2 is not None,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
            **launch_options(x.device),
        )
    if new_residual is None:
        return out.view(x.shape)
    return out.view(x.shape), new_residual.view(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as `[rows, size]` with a unit stride along the row (copied only if it must be)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()
