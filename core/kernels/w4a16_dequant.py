"""W4A16 at many rows: de-quantize the layer into a shared bf16 buffer, then one cuBLAS GEMM.

Weight-only 4-bit pays while a step streams its weights (decode at small batch). With many rows
of x (prefill chunks, mixed steps, decode at batch 64+) the GEMM does enough arithmetic per
weight that the W4A16 kernels, which unpack every weight once per block of rows, lose to
cuBLAS on bf16 weights; writing the bf16 matrix once (0.5 bytes read + 2 written per weight)
and running cuBLAS on it costs far less than that, and the bf16 matrix lives only for the
call: every layer of a model de-quantizes into the same `[K, N]` buffer (the w4a16 plugin's
`DequantBuffer`), sized at load for the largest layer, so the memory saving of 4-bit weights
is kept. vLLM's Marlin runs its own GEMM at every batch size instead; here this path was
measured against pegboard's W4A16 kernels (docs/benchmarks.md, session 14), and the rows from
which a layer takes it are the plugin's `dequant_min_rows`.

The weights are in the serving layout of `pegboard.plugins.linear.int4`: `qweight [K / 8, N]`
int32 (nibbles `p`, `p + 4` of a word hold input columns `2p`, `2p + 1`), `scales`, `offsets`
`[K / group, N]`, `w = q * scale + offset` computed in float32 (exact: q has 4 bits, a scale at
most 11 significant ones) and rounded once to the activation dtype, as
`int4.dequantize_packed` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 16  # rows of words per program: 128 input columns
BLOCK_N = 128


@triton.jit
def _dequant_kernel(
    q_ptr, scale_ptr, offset_ptr, out_ptr, words, n, group,
    BLOCK_WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)[:, None]
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (w < words) & (c < n)
    q = tl.load(q_ptr + w * n + c, mask=mask, other=0)
    g = (w * 8) // group  # a word's eight columns share one group (group % 8 == 0)
    scale = tl.load(scale_ptr + g * n + c, mask=mask, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + g * n + c, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(4):
        lo = ((q >> (4 * p)) & 0xF).to(tl.float32) * scale + offset
        hi = ((q >> (4 * p + 16)) & 0xF).to(tl.float32) * scale + offset
        row = w * 8 + 2 * p
        tl.store(out_ptr + row * n + c, lo.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + (row + 1) * n + c, hi.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_into(
    out: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Write the `[K, N]` matrix of a serving-layout layer into `out` (at least `K * N`
    elements, contiguous; its dtype is the result's) and return it as a `[K, N]` view."""
    words, n = qweight.shape
    k = words * 8
    if group_size % 8 or k % group_size:
        raise ValueError(f"group size {group_size} must be whole words dividing K={k}")
    view = out.view(-1)[: k * n].view(k, n)
    grid = (triton.cdiv(words, BLOCK_WORDS), triton.cdiv(n, BLOCK_N))
    _dequant_kernel[grid](
        qweight, scales, offsets, view, words, n, group_size,
        BLOCK_WORDS=BLOCK_WORDS, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return view


def dequant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    buffer: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T (+ bias)` through the de-quantized `W` in `buffer` (see the module docstring)."""
    w = dequantize_into(buffer, qweight, scales, offsets, group_size)
    y = torch.mm(x.reshape(-1, x.shape[-1]), w)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], w.shape[1])
