"""W4A16 matmul through PyTorch's own int4 kernel (tinygemm: `torch._weight_int4pack_mm`), which
ships inside every CUDA build of torch: no extra package. Faster than cuBLAS bf16 at one to four
rows of x on an H200 (docs/kernels.md "tinygemm"), slower from 16 rows on, so the `w4a16`
plugin runs it for decode calls of at most `MAX_ROWS` rows and pegboard's Triton kernels above.

Its weights (`pegboard.plugins.linear.tinygemm_layout`): 4-bit codes q packed by
`torch._convert_weight_to_int4pack` and `scales_and_zeros [K / group, N, 2]` bf16, with
`w = (q - 8) * scale + zero`. The checks torch makes (aten/src/ATen/native/cuda/int4mm.cu):

- `_convert_weight_to_int4pack(in, inner_k_tiles)`: `in` uint8 `[N, K / 2]`, contiguous, two
  codes per byte, column `2i` in the high nibble; `inner_k_tiles` 2, 4 or 8; K a positive
  multiple of `inner_k_tiles * 16`. Out: int32 `[ceil(N / 8), K / (inner_k_tiles * 16), 32,
  inner_k_tiles / 2]`.
- `_weight_int4pack_mm(x, w, group, scales_and_zeros)`: x bf16, 2-D, contiguous; w as packed
  above; group 32, 64, 128 or 256, dividing K; `scales_and_zeros` `[K / group, 8 * ceil(N / 8),
  2]`, so N a multiple of 8 (else the kernel's padded N disagrees with the layer's); a new bf16
  `[M, N]`. Compiled only for CUDA 12+ on sm_80+ ("not available for build" elsewhere).

On CPU torch has `_convert_weight_to_int4pack_for_cpu` (int32 `[N, K]` codes, its own blocked
packing into uint8 `[N, K / 2]`, N a multiple of 16) and `_weight_int4pack_mm_for_cpu` (same
`w = (q - 8) * scale + zero`, same groups): the plugin never runs them, but `tinygemm_linear`
calls them for CPU tensors, so tests exercise the whole conversion on CPU.
"""

from __future__ import annotations

import torch
from pegboard.core.kernels.cuda_support import bf16_sm80_reason

#: Rows of x up to which the plugin calls tinygemm (more: pegboard's Triton kernels). H200,
#: Llama-3.1-8B's four linears summed (scripts/bench_int4pack.py): 1.65x cuBLAS bf16 at 1 row,
#: 1.18x at 4 (qkv alone 0.99x), 0.46x at 16; pegboard's Triton kernels are ~0.8-0.9x at 4-16.
#: So 4, not 2; 5-15 rows were not measured and stay with Triton.
MAX_ROWS = 4
#: Group sizes the kernel is compiled for; a layer's group must be a multiple of one of them
#: (per-channel scales are repeated per group of 256 columns, `tinygemm_group`).
GROUPS = (256, 128, 64, 32)
#: `inner_k_tiles` in order of preference: 8 was fastest at one row on the H200, 4 at four.
INNER_K_TILES = (8, 4, 2)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why tinygemm cannot run this model's layers here (None if it can): a CUDA device of
    compute capability 8.0 or more, bf16 activations (the only dtype the kernel takes), and a
    torch that has the op; NVIDIA GPUs only (ROCm packs its tiles differently)."""
    reason = bf16_sm80_reason("tinygemm", device, dtype)
    if reason is None and not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        reason = f"torch {torch.__version__} has no _weight_int4pack_mm"
    return reason


def tinygemm_group(group: int) -> int | None:
    """The largest group size tinygemm takes that divides the layer's `group` (None if none
    does): a layer of group 512 or per-channel runs at 256, each scale repeated."""
    return next((g for g in GROUPS if group % g == 0), None)


def inner_k_tiles(k: int) -> int | None:
    """The first of `INNER_K_TILES` whose tile of `16 * tiles` columns divides K."""
    return next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)


def shape_unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why tinygemm cannot take a `[N, K]` layer with this group size (None if it can)."""
    if n % 8:
        return f"N={n} is not a multiple of 8"
    if inner_k_tiles(k) is None:
        return f"K={k} is not a multiple of 32"
    if tinygemm_group(group) is None:
        return f"group size {group} is not a multiple of 32"
    return None


def tinygemm_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for weights in tinygemm's layout: x `[..., K]` bf16, a new `[..., N]`
    bf16 tensor. CUDA tensors go to `torch._weight_int4pack_mm` (no host synchronisation, so
    it can be captured in a CUDA graph), CPU tensors to its CPU twin (tests)."""
    n = scales_and_zeros.shape[1]
    rows = x.numel() // x.shape[-1]
    if rows == 0:  # the CUDA kernel would launch an empty grid, an error
        return x.new_empty(*x.shape[:-1], n)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    if x.is_cuda:
        y = torch._weight_int4pack_mm(x2, qweight, group_size, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, qweight, group_size, scales_and_zeros)
    if bias is not None:
        y = y.add_(bias)
    return y.reshape(*x.shape[:-1], n)
