"""4-bit weights in one canonical form, whatever checkpoint format they came from.

Every format's reader (`formats.py`) turns a projection's tensors into an `Int4Weights`:
`q [N, K]` integer values in 0..15, and per group of `group_size` input columns a scale and an
offset, `w = q * scale + offset` (GPTQ/AWQ/compressed-tensors: `offset = -zero * scale`; GGUF
Q4_1: the block minimum; Q4_0: `-8 * d`). `g_idx` (GPTQ/compressed-tensors activation order)
maps each input column to its group when groups are not contiguous.

The serving layout (`pack`) is the one the Triton kernels stream: `qweight [K / 8, N]` int32,
eight consecutive input columns per word, N contiguous, so a program loads whole rows of output
columns. Inside a word the columns are interleaved (`SERVING_NIBBLE`): columns `2p` and `2p + 1`
sit in nibbles `p` and `p + 4`, so one and-or, `(word >> 4p) & 0x000F000F | 0x43004300`, makes
the bf16 pair `(128 + q[2p], 128 + q[2p + 1])` of two neighbouring columns (Marlin / FasterTransformer's
interleaving; `pegboard.core.kernels.w4a16_kernels`); `scales`/`offsets` `[K / group, N]` in the
activation dtype; with activation order, the input columns are permuted at load so groups are
contiguous again, and `perm` permutes x the same way at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pegboard.sdk.linear import QuantizationError

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
#: The nibble of a serving-layout word that holds its input column `i` (0..7): columns 2p, 2p + 1
#: in nibbles p, p + 4. Checkpoint formats keep their own plain order (`pack_int32`).
SERVING_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
#: The input column held by nibble `j`: the inverse of `SERVING_NIBBLE`.
SERVING_COLUMN = tuple(SERVING_NIBBLE.index(j) for j in range(8))


@dataclass
class Int4Weights:
    """One matrix `[N, K]`: `q` uint8 values 0..15, `scales`/`offsets` float32 `[N, G]`, and
    optionally `g_idx` int64 `[K]` (the group of each input column; None: `k // group_size`)."""

    q: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    g_idx: torch.Tensor | None = None

    def groups(self) -> torch.Tensor:
        """The group of each input column."""
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix `q * scale + offset` (the oracle every path is compared with)."""
        g = self.groups()
        return self.q.float() * self.scales.float()[:, g] + self.offsets.float()[:, g]


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into its eight 4-bit values, lowest bits first, along `dim`
    (`[K / 8, N]` with dim 0 gives `[K, N]`)."""
    p = packed.to(torch.int32)
    nib = (p.unsqueeze(-1) >> SHIFTS.to(p.device)) & 0xF  # [..., 8]
    if dim == 0:
        return nib.permute(0, 2, 1).reshape(p.shape[0] * 8, p.shape[1]).to(torch.uint8)
    return nib.reshape(p.shape[0], p.shape[1] * 8).to(torch.uint8)


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `unpack_int32`: eight 4-bit values per int32 along `dim`."""
    v = values.to(torch.int32) & 0xF
    if dim == 0:
        v = v.reshape(v.shape[0] // 8, 8, v.shape[1]).permute(0, 2, 1)
    else:
        v = v.reshape(v.shape[0], v.shape[1] // 8, 8)
    words = (v << SHIFTS.to(v.device)).sum(-1, dtype=torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass
class PackedInt4:
    """The serving layout (see the module docstring); `perm` None without activation order."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    perm: torch.Tensor | None


def contiguous_groups(w: Int4Weights, name: str) -> tuple[Int4Weights, torch.Tensor | None]:
    """Reorder input columns so each group is contiguous (activation order); returns the
    reordered weights and the column permutation (None when they already were)."""
    if w.g_idx is None:
        return w, None
    k = w.q.shape[1]
    perm = torch.argsort(w.g_idx, stable=True)
    expected = torch.arange(k, device=w.g_idx.device) // w.group_size
    if not torch.equal(w.g_idx[perm], expected):
        raise QuantizationError(f"{name}: g_idx does not give every group {w.group_size} columns")
    if torch.equal(perm, torch.arange(k, device=perm.device)):
        return Int4Weights(w.q, w.scales, w.offsets, w.group_size), None
    return Int4Weights(w.q[:, perm], w.scales, w.offsets, w.group_size), perm


def exact_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The first of `dtype`, float16, float32 that represents every one of `values` (float32)
    exactly: scales read from float16 checkpoints stay float16 in a bf16 model, GPTQ's
    `-zero * scale` offsets (up to 15 x a float16 scale) need float32."""
    for candidate in (dtype, torch.float16):
        if candidate.itemsize < 4 and torch.equal(values.to(candidate).float(), values):
            return candidate
    return torch.float32


def pack(w: Int4Weights, dtype: torch.dtype) -> PackedInt4:
    """The serving layout of weights whose groups are contiguous, for activations in `dtype`."""
    scales, offsets = w.scales.t().float(), w.offsets.t().float()
    return PackedInt4(
        qweight=pack_serving(w.q.t()),
        scales=scales.to(exact_dtype(scales, dtype)).contiguous(),
        offsets=offsets.to(exact_dtype(offsets, dtype)).contiguous(),
        group_size=w.group_size,
        perm=None,
    )


def pack_serving(q: torch.Tensor) -> torch.Tensor:
    """`q [K, N]` (values 0..15) as the serving layout's `[K / 8, N]` int32 words, each word's
    columns interleaved (`SERVING_NIBBLE`)."""
    k, n = q.shape
    nibbles = q.reshape(k // 8, 8, n)[:, list(SERVING_COLUMN)]  # nibble j holds column COLUMN[j]
    return pack_int32(nibbles.reshape(k, n), dim=0).contiguous()


def unpack_serving(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_serving`: `[K / 8, N]` words to `[K, N]` uint8 values."""
    nibbles = unpack_int32(qweight, dim=0)  # row 8 * w + j: nibble j of word w
    k, n = nibbles.shape
    return nibbles.reshape(k // 8, 8, n)[:, list(SERVING_NIBBLE)].reshape(k, n)


def dequantize_packed(p: PackedInt4, dtype: torch.dtype) -> torch.Tensor:
    """The matrix `[N, K]` (columns in the permuted order) of a packed layer: computed in
    float32, rounded once to `dtype` (as the kernels do)."""
    q = unpack_serving(p.qweight)  # [K, N]
    scales = p.scales.float().repeat_interleave(p.group_size, dim=0)
    offsets = p.offsets.float().repeat_interleave(p.group_size, dim=0)
    return (q.float() * scales + offsets).to(dtype).t()
