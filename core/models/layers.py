"""Small building blocks of the decoder, numerically matched to transformers.

Each block computes with PyTorch ops unless `set_fused_kernels(True)` switched it to its fused
Triton kernel (`pegboard.core.kernels`, CUDA only), which matches those ops' numerics (the
linear layers' GEMV kernels up to the order of the float32 sums).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pegboard.sdk.linear import LinearLayer, LinearSpec
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, cast back, then scaled (HF `LlamaRMSNorm`).

    `norm(x)` returns the normalised `x`; `norm(x, residual)` first adds the residual stream
    and returns `(normalised sum, sum)`, the sum in `x`'s dtype (SGLang/vLLM's fused add + norm,
    so a decoder layer carries the residual separately).
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.kernel: Callable | None = None  # the fused Triton kernel, when switched on

    def set_fused_kernels(self, enabled: bool) -> None:
        if enabled:
            from pegboard.core.kernels.norm import rms_norm

            self.kernel = rms_norm
        else:
            self.kernel = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is None:
            return self._normalise(x)
        x = x + residual
        return self._normalise(x), x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Linear(nn.Linear, LinearLayer):
    """`nn.Linear` whose products of decode's row counts can run as Triton kernels: with
    `set_fused_kernels(True)`, `pegboard.core.kernels.dense.linear` picks the kernel measured
    faster than cuBLAS for the weight's shape and the number of rows (the GEMV up to 8 rows,
    the skinny GEMM up to 256), or `F.linear`. `PEGBOARD_DISABLE_GEMV=1` keeps `F.linear`
    with the other fused kernels on. `forward(gate_up, gate_up=True)` takes a SwiGLU MLP's
    gate/up output (`[..., 2 * in_features]`) and applies SiLU-and-mul first: switched on, in
    the GEMV (`dense.silu_linear`; the MLP passes it only where the GEMV takes the rows).

    The dense layer of the `bf16` linear plugin (and of any plugin's unquantized layers): its
    parameters are named as in the checkpoint, so the loader fills them directly."""

    loads_by_parameter = True
    kernel: Callable | None = None  # `dense.linear`, when switched on

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.spec = LinearSpec("linear", in_features, out_features, bias=bias)

    def describe(self) -> str:
        return "dense" + (" (GEMV / skinny GEMM kernels)" if self.kernel is not None else "")

    def set_fused_kernels(self, enabled: bool) -> None:
        from pegboard.core.kernels import gemv_disabled

        if enabled and not gemv_disabled():
            from pegboard.core.kernels.dense import linear

            self.kernel = linear
        else:
            self.kernel = None

    def forward(self, x: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.bias, gate_up=gate_up)
        return F.linear(silu_and_mul(x) if gate_up else x, self.weight, self.bias)


class MergedLinear(Linear):
    """One GEMM for several projections of the same input (q/k/v, gate/up).

    `shards` names the checkpoint projections stacked along the output dimension, in order,
    with their output sizes; the loader copies each checkpoint tensor into its row range.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards.items():
            self.shards[name] = (start, size)
            start += size


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for a fused `[..., 2 * intermediate]` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
