"""The layout pegboard's Marlin-style CUDA kernel streams (`pegboard.core.kernels.w4a16_marlin`),
made from the serving layout (`int4.py`).

The kernel computes `y.T = W @ x.T` with `mma.m16n8k16` (bf16 in, float32 out), the weights as
the A operand, straight from global memory into registers. One 16 x 16 tile of W (16 output
rows, 16 input columns) is 256 codes = 32 words, one per lane, and a lane's word is exactly its
A fragment: after `(word >> 4r) & 0x000F000F | 0x43004300` (one `lop3`, r = 0..3) register r
holds the bf16 pair `(128 + q, 128 + q')` of fragment elements `a[2r], a[2r + 1]`, so nibble j
of the word is element `2 (j % 4) + j // 4`, whose (row, column) in the tile the PTX ISA fixes
(`fragment_position`). Words are ordered `[N / 16, K / 64, 32, 4]`: per tile of 16 rows, per 64
input columns (a chunk), lane l's four consecutive words are the chunk's four mma tiles (one
16-byte load), and a warp reads 512 contiguous bytes.

The mma's k index of a tile is not the column order: a dot product does not care, so the chunk's
columns are dealt to tiles so that a lane's B registers (x.T) for two tiles are 8 consecutive
columns of x, one 16-byte load (`CHUNK_COLUMN`): tile j, k index κ is column
`32 (j // 2) + 8 t + 4 (j % 2) + 2 (κ // 8) + κ % 2` with `t = (κ % 8) // 2`, the
threadID_in_group whose B fragment holds κ. Tiles 0-1 and 2-3 keep to their own 32 columns, so
groups of 32 stay whole tiles.

Scales and offsets become `params [N / 16, K / group, 8, 4]`: for row tile, group and
`g = lane / 4`, `(scale, zero)` of row g and of row g + 8 (one 16-byte load per lane, shared by
the quad), with `w = (q - 8) * scale + zero`, `zero = offset + 8 * scale` (as tinygemm's centred
zero: at most 8 scales for integer zero points). In float32 (the default) both are exact for
checkpoint scales (float16) and integer zero points, so the kernel multiplies by the
checkpoint's weights exactly; float16 (scales from float16 checkpoints exact, zeros to 11
bits) or bf16 (tinygemm's precision) halve their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pegboard.plugins.linear.int4 import PackedInt4, unpack_serving

#: Fragment element of nibble j (0..7) of a lane's word (see the module docstring).
NIBBLE_ELEMENT = tuple(2 * (j % 4) + j // 4 for j in range(8))


def chunk_column(tile: int, kappa: int) -> int:
    """The column within its 64-column chunk of k index `kappa` (0..15) of mma tile `tile`
    (0..3): see the module docstring."""
    t, hi, lo = (kappa % 8) // 2, kappa // 8, kappa % 2
    return 32 * (tile // 2) + 8 * t + 4 * (tile % 2) + 2 * hi + lo


#: `CHUNK_COLUMN[4 * tile + kappa]`: `chunk_column` as a table (a permutation of 0..63).
CHUNK_COLUMN = tuple(chunk_column(j, kappa) for j in range(4) for kappa in range(16))


@dataclass
class MarlinLayout:
    """One layer's tensors for the Marlin-style kernel (see the module docstring)."""

    qweight: torch.Tensor  # int32 [N / 16, K / 64, 32, 4]
    params: torch.Tensor  # float32 or bf16 [N / 16, K / group, 8, 4]: (scale, zero) x 2 rows
    group_size: int  # K for per-channel scales
    n: int
    k: int
    counters: torch.Tensor  # int32 [N / 16] zeros: the kernel's split-K semaphores


def fragment_position(lane: int, element: int) -> tuple[int, int]:
    """(row, column) in its 16 x 16 tile of A-fragment element `element` (0..7) of `lane` for
    `mma.m16n8k16` with 16-bit inputs (PTX ISA, "Matrix Fragments for mma.m16n8k16"): rows
    groupID (+ 8 for a2, a3, a6, a7), columns 2 * threadID_in_group + (element & 1) (+ 8 for
    a4..a7)."""
    group_id, thread_in_group = lane >> 2, lane & 3
    row = group_id + 8 * ((element >> 1) & 1)
    col = 2 * thread_in_group + (element & 1) + 8 * (element >> 2)
    return row, col


def nibble_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns `[32, 8]` in the 16 x 16 tile of nibble j of lane l's word."""
    pos = [[fragment_position(lane, NIBBLE_ELEMENT[j]) for j in range(8)] for lane in range(32)]
    t = torch.tensor(pos)
    return t[..., 0], t[..., 1]


def shape_unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why the layout cannot hold a `[N, K]` layer with this group size (None if it can)."""
    if n % 16:
        return f"N={n} is not a multiple of 16"
    if k % 64:
        return f"K={k} is not a multiple of 64"
    if group % 32 or k % group:
        return f"group size {group} is not a multiple of 32 dividing K={k}"
    return None


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """`q [N, K]` codes (0..15) as the kernel's int32 words `[N / 16, K / 64, 32, 4]`."""
    n, k = q.shape
    rows, cols = nibble_positions()
    # [row tile, row in tile, chunk, 64 columns in (tile, k index) order]
    dealt = q.to(torch.uint8).reshape(n // 16, 16, k // 64, 64)[..., list(CHUNK_COLUMN)]
    tiles = dealt.reshape(n // 16, 16, k // 64, 4, 16).permute(0, 2, 3, 1, 4)
    nibbles = tiles[..., rows.to(q.device), cols.to(q.device)]  # [n/16, k/64, 4, 32 lanes, 8]
    words = torch.zeros(nibbles.shape[:-1], dtype=torch.int32, device=q.device)
    for j in range(8):  # int32 shifts wrap: nibble 7 lands in the sign bit as it should
        words |= nibbles[..., j].to(torch.int32) << (4 * j)
    return words.permute(0, 1, 3, 2).contiguous()  # [n/16, k/64, 32, 4]


def pack_params(
    scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`scales`/`offsets [K / group, N]` (`w = q * scale + offset`) as the kernel's
    `[N / 16, K / group, 8, 4]` (scale, zero = offset + 8 * scale) of rows g and g + 8."""
    s = scales.float().t()  # [N, G]
    zero = offsets.float().t() + 8 * s
    n, groups = s.shape
    pair = torch.stack([s, zero], -1).reshape(n // 16, 2, 8, groups, 2)  # [tile, half, g, G, 2]
    return pair.permute(0, 3, 2, 1, 4).reshape(n // 16, groups, 8, 4).to(dtype).contiguous()


def to_marlin(p: PackedInt4, param_dtype: torch.dtype = torch.float32) -> MarlinLayout:
    """The kernel's tensors for the packed layer `p` (its shape checked by
    `shape_unsupported_reason`); on p's device."""
    q = unpack_serving(p.qweight).t()  # [N, K]
    n, k = q.shape
    reason = shape_unsupported_reason(n, k, p.group_size)
    if reason:
        raise ValueError(f"Marlin layout: {reason}")
    params = pack_params(p.scales, p.offsets, param_dtype)
    counters = torch.zeros(n // 16, dtype=torch.int32, device=q.device)
    return MarlinLayout(pack_codes(q), params, p.group_size, n, k, counters)


def dequantize_marlin(layout: MarlinLayout) -> torch.Tensor:
    """The float32 matrix `[N, K]` the kernel multiplies by: `(q - 8) * scale + zero` from the
    layout's own tensors (the test oracle for `to_marlin`)."""
    n, k = layout.n, layout.k
    rows, cols = nibble_positions()
    words = layout.qweight.to(torch.int64) & 0xFFFFFFFF  # [n/16, k/64, 32, 4]
    nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, device=words.device)) & 0xF
    q = torch.zeros(n // 16, k // 64, 4, 16, 16, dtype=torch.int64, device=words.device)
    q[..., rows, cols] = nibbles.permute(0, 1, 3, 2, 4)  # [n/16, k/64, 4, 32, 8]
    dealt = q.permute(0, 3, 1, 2, 4).reshape(n // 16, 16, k // 64, 64)
    q = torch.empty_like(dealt)
    q[..., list(CHUNK_COLUMN)] = dealt
    q = q.reshape(n, k).float()
    p = layout.params.float()  # [n/16, G, 8, 4]
    groups = p.shape[1]
    pair = p.reshape(n // 16, groups, 8, 2, 2).permute(0, 3, 2, 1, 4).reshape(n, groups, 2)
    scale = pair[..., 0].repeat_interleave(k // groups, 1)
    zero = pair[..., 1].repeat_interleave(k // groups, 1)
    return (q - 8) * scale + zero
