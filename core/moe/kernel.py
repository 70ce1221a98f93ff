"""Which computation runs a MoE model's routed experts (`--moe-kernel`).

- `triton`: the fused Triton MoE (`pegboard.core.kernels.fused_moe.fused_experts`): grouped
  GEMMs over (token, expert) pairs sorted by expert, SiLU-and-mul fused into the gate/up GEMM,
  no host sync (CUDA graphs capture every decode batch size); the router's softmax and top-k
  run as one kernel too (`fused_moe_topk.softmax_topk`);
- `torch`: the PyTorch path of `MoEExperts.forward` (the reference; the only one on CPU);
- `auto` (default): `triton` where the model's other fused kernels run (a CUDA device with
  Triton, without `--disable-fused-kernels`), else `torch`.
"""

from __future__ import annotations

import os

from pegboard.core import kernels
from pegboard.core.models.moe import moe_blocks
from pegboard.core.moe.flags import MoEFlagError
from torch import nn

MOE_KERNELS = ("auto", "triton", "torch")


def select_moe_kernel(model: nn.Module, choice: str = "auto") -> str | None:
    """Set every sparse layer's expert computation to `choice` ("auto", "triton", "torch");
    returns the one that runs ("triton" or "torch"), None for a model without sparse layers.
    `triton` on a device it cannot run on raises `MoEFlagError` (on CPU it runs only in
    Triton's interpreter, `TRITON_INTERPRET=1`: tests)."""
    if choice not in MOE_KERNELS:
        raise MoEFlagError(f"--moe-kernel {choice!r}; choose one of {', '.join(MOE_KERNELS)}")
    blocks = moe_blocks(model)
    if not blocks:
        return None
    device = blocks[0].experts.w13.device
    reason = kernels.unavailable_reason(device)
    if choice == "triton" and reason is not None and not _interpreted(reason):
        raise MoEFlagError(f"--moe-kernel triton: {reason}")
    use_triton = choice == "triton" or (
        choice == "auto" and getattr(model, "fused_kernels", False) and reason is None
    )
    kernel = router = None
    if use_triton:
        from pegboard.core.kernels.fused_moe import fused_experts
        from pegboard.core.kernels.fused_moe_topk import softmax_topk

        kernel, router = fused_experts, softmax_topk
    for block in blocks:
        block.experts.kernel = kernel
        block.router_kernel = router
    return "triton" if use_triton else "torch"


def _interpreted(reason: str) -> bool:
    """Triton's CPU interpreter is on and the only obstacle is the CPU device."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "cpu" in reason
