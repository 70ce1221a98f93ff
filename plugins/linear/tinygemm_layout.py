"""The layout PyTorch's tinygemm kernel reads, made from pegboard's serving layout (`int4.py`).

tinygemm (`pegboard.core.kernels.w4a16_tinygemm`) multiplies `w = (q - 8) * scale + zero` with
the 4-bit codes q packed by torch for the device and `scales_and_zeros [K / group, N, 2]` in
bf16. The serving layout's `w = q * scale + offset` is the same matrix with
`zero = offset + 8 * scale` (exact in float32 for integer zero points: `(8 - z) * scale`), and
the codes are the serving ones, unpacked from its interleaved words. A group tinygemm is not
compiled for (per-channel, 512) is split into groups of 256 (or 128, 64, 32) sharing its scale.
Activation order needs nothing: the serving columns are already permuted so groups are
contiguous, and the layer permutes x before either kernel.

**Precision.** tinygemm keeps scale and zero in bf16 (8 significant bits; checkpoints store
float16 scales, 11) and de-quantizes with one bf16 fma, so its weights are not exactly the
checkpoint's (pegboard's own kernels keep scales exact: gemlite_layout.py). The centred form
helps: a zero `(8 - z) * scale` is at most 8 scales, where the first layout's bf16 offsets
`-z * scale` were up to 15 (1.8x bf16's logit error, docs/quantization.md). Measured on CPU
(`scripts/tinygemm_accuracy.py`, 2026-12-01, the CUDA kernel's numerics emulated), error
relative to the serving numerics (= a de-quantized checkpoint in bf16):

- random 2048 x 4096 layers, float16 scales, groups 32/128, sym/asym: 1.13-1.18x per layer
  (2.7e-3 vs 2.4e-3 with bf16 x and output: one more rounding of bf16's size);
- the tests' tiny random Llama, GPTQ g32, logits vs float32: asym 1.10x (4.2e-2 vs 3.8e-2;
  the first layout's bf16 offsets, emulated again: 1.80x), sym 0.84x (zero = 0);
- the bundled SmolLM2-135M (Q4_1, group 32), logits vs its float32 run: 0.89x (1.37e-2 vs
  1.53e-2), argmax equal at 95% of positions for both.

Not materially worse than bf16's own rounding, so `--w4a16-kernel auto` gives tinygemm every
layer it can take that marlin cannot, whether or not its scales and zeros are exact in bf16.

**Memory.** The layer keeps both layouts (tinygemm for decode's few rows, the serving one for
prefill and larger batches): the 4-bit weights are held twice, ~1.06 bytes per weight at group
128 instead of 0.53, still about half of bf16's 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pegboard.core.kernels.w4a16_tinygemm import inner_k_tiles, tinygemm_group
from pegboard.plugins.linear.int4 import PackedInt4, unpack_serving


@dataclass
class TinygemmLayout:
    """One layer's tensors for tinygemm (see the module docstring)."""

    qweight: torch.Tensor  # the codes as torch packs them for this device
    scales_and_zeros: torch.Tensor  # [K / group_size, N, 2] bf16: (scale, zero)
    group_size: int


def codes(p: PackedInt4) -> torch.Tensor:
    """The 4-bit codes `[N, K]` (uint8, columns in the serving order) of a packed layer."""
    return unpack_serving(p.qweight).t().contiguous()


def scales_and_zeros(p: PackedInt4, group: int) -> torch.Tensor:
    """`[K / group, N, 2]` float32 (scale, zero) with `w = (q - 8) * scale + zero`: the serving
    layout's values, for groups of `group` columns (a divisor of its own group size)."""
    repeat = p.group_size // group
    scales = p.scales.float().repeat_interleave(repeat, dim=0)
    offsets = p.offsets.float().repeat_interleave(repeat, dim=0)
    return torch.stack([scales, offsets + 8 * scales], dim=-1)


def pack_codes(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """`q [N, K]` (values 0..15) packed by torch for q's device: on CUDA two codes per byte,
    column `2i` in the high nibble, then `_convert_weight_to_int4pack`; on CPU the int32 codes
    to `_convert_weight_to_int4pack_for_cpu`, which packs them itself."""
    if q.is_cuda:
        pairs = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
        return torch._convert_weight_to_int4pack(pairs, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), tiles)


def to_tinygemm(p: PackedInt4) -> TinygemmLayout:
    """tinygemm's tensors for the packed layer `p` (its shape and group checked by
    `w4a16_tinygemm.shape_unsupported_reason`)."""
    q = codes(p)
    group = tinygemm_group(p.group_size)
    sz = scales_and_zeros(p, group).to(torch.bfloat16).contiguous()
    return TinygemmLayout(pack_codes(q, inner_k_tiles(q.shape[1])), sz, group)


def dequantize_tinygemm(p: PackedInt4, dtype: torch.dtype) -> torch.Tensor:
    """The matrix `[N, K]` tinygemm multiplies by for the layer `p`: `(q - 8) * scale + zero`
    with bf16 scale and zero, in float32, rounded once to `dtype` (the test oracle)."""
    group = tinygemm_group(p.group_size)
    sz = scales_and_zeros(p, group).to(torch.bfloat16).float()
    scales = sz[..., 0].repeat_interleave(group, dim=0)
    zeros = sz[..., 1].repeat_interleave(group, dim=0)
    q = codes(p).t().float()
    return ((q - 8) * scales + zeros).to(dtype).t()
