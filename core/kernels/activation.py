"""SiLU-and-mul: `silu(gate) * up` over a fused `[T, 2 * I]` gate/up projection, in one pass.

Program `(row, block)` reads `BLOCK` gate and up values of one row and writes `BLOCK` outputs.
Like PyTorch's `F.silu(gate) * up`, SiLU is computed in float32 and rounded to the activation
dtype before the product, which is rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    GateUp, Out, stride_x, stride_o, size, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    wait_for_inputs(PDL)
    gate = tl.load(GateUp + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_x + size + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = [..., 2 * I]` (gate first, contiguous last dimension);
    returns a new `[..., I]` tensor."""
    size = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], size, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        block = min(BLOCK, triton.next_power_of_2(size))
        grid = (x.shape[0], triton.cdiv(size, block))
        _silu_and_mul_kernel[grid](
            x,
            out,
            x.stride(0),
            out.stride(0),
            size,
            BLOCK=block,
            num_warps=4,
            **launch_options(x.device),
        )
    return out.view(*gate_up.shape[:-1], size)
