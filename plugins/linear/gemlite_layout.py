"""The layout gemlite's A16W4 kernels read, made from pegboard's serving layout (`int4.py`).

gemlite (`pegboard.core.kernels.w4a16_gemlite`) streams `W_q [K / 8, N]` int32 words holding
eight consecutive input columns each, **lowest nibble first** (GPTQ's `qweight` order; pegboard's
serving words interleave them, `int4.SERVING_NIBBLE`), and per group of input columns a
`scales [G, N]` and `zeros [G, N]` row in one "meta" dtype, with either

- `w = (q - zeros) * scales` (its `W_group_mode` 3): zero points that are small multiples of
  1/2 (GPTQ/AWQ/compressed-tensors integers, GGUF Q4_0's 8), kept exact next to float16 scales;
  a zero point the same integer everywhere (symmetric checkpoints) is one int32 scalar, or
- `w = q * scales + zeros` (`W_group_mode` 4, "fma"): any other offsets (GGUF Q4_1's block
  minimum).

The meta dtype is the first of (activations' dtype, float16, float32) holding every scale and
zero exactly, as `pack` keeps them exact: rounding GPTQ's float16 scales to bf16 cost 1.8x
bf16's own logit error (docs/kernels.md). Activation order needs nothing here: the serving
layout's groups are already contiguous (the layer permutes x, as for pegboard's kernels).
Everything is plain torch, so the conversion is checked on CPU (`dequantize_gemlite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pegboard.plugins.linear.int4 import (
    PackedInt4,
    pack_int32,
    pack_serving,
    unpack_int32,
    unpack_serving,
)


@dataclass
class GemliteLayout:
    """One layer's tensors for gemlite (see the module docstring)."""

    qweight: torch.Tensor  # [K / 8, N] int32, nibble j = input column 8 w + j
    scales: torch.Tensor  # [G, N], meta dtype
    zeros: torch.Tensor  # [G, N] meta dtype, or a 0-dim int32 (one zero point for all)
    group_size: int
    fma: bool  # w = q * scales + zeros (else (q - zeros) * scales)


def plain_from_serving(qweight: torch.Tensor) -> torch.Tensor:
    """Serving-layout words (interleaved nibbles) as gemlite's words (columns in order)."""
    return pack_int32(unpack_serving(qweight), dim=0).contiguous()


def serving_from_plain(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `plain_from_serving`."""
    return pack_serving(unpack_int32(qweight, dim=0))


def _meta_dtype(dtype: torch.dtype, *tensors: torch.Tensor) -> torch.dtype:
    """The first of `dtype`, float16, float32 that holds every value of `tensors` exactly."""
    for candidate in (dtype, torch.float16):
        if candidate.itemsize < 4 and all(torch.equal(t.to(candidate).float(), t) for t in tensors):
            return candidate
    return torch.float32


def to_gemlite(p: PackedInt4, dtype: torch.dtype) -> GemliteLayout:
    """gemlite's tensors for the packed layer `p`, for activations in `dtype`: the same values
    `w = q * scale + offset` (see the module docstring for which form and meta dtype)."""
    scales, offsets = p.scales.float(), p.offsets.float()
    zeros = -offsets / scales
    qweight = plain_from_serving(p.qweight)
    shift = torch.equal((zeros * 2).round(), zeros * 2) and torch.equal(-zeros * scales, offsets)
    if shift:
        z = zeros.flatten()[0]
        if torch.equal(zeros, z.expand_as(zeros)) and z == z.round():
            meta = _meta_dtype(dtype, scales)
            scalar = torch.tensor(int(z), dtype=torch.int32, device=scales.device)
            return GemliteLayout(qweight, scales.to(meta), scalar, p.group_size, fma=False)
        meta = _meta_dtype(dtype, scales, zeros)
        return GemliteLayout(qweight, scales.to(meta), zeros.to(meta), p.group_size, fma=False)
    meta = _meta_dtype(dtype, scales, offsets)
    return GemliteLayout(qweight, scales.to(meta), offsets.to(meta), p.group_size, fma=True)


def dequantize_gemlite(g: GemliteLayout, dtype: torch.dtype) -> torch.Tensor:
    """The matrix `[N, K]` gemlite's kernels multiply by, computed in float32 and rounded once
    to `dtype` (the test oracle: it must equal `int4.dequantize_packed` of the same layer)."""
    q = unpack_int32(g.qweight, dim=0).float()  # [K, N]
    scales = g.scales.float().repeat_interleave(g.group_size, dim=0)
    zeros = g.zeros.float()
    if zeros.dim() == 2:
        zeros = zeros.repeat_interleave(g.group_size, dim=0)
    w = q * scales + zeros if g.fma else (q - zeros) * scales
    return w.to(dtype).t()
