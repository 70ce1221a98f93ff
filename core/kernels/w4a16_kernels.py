"""The Triton kernels behind `pegboard.core.kernels.w4a16` (the launcher, configurations and
layout are described there): `y = x @ W.T (+ bias)` for 4-bit W in the serving layout of
`pegboard.plugins.linear.int4` — `qweight [K / 8, N]` int32, N contiguous, the eight columns of
a word interleaved so that nibbles `p` and `p + 4` hold columns `2p` and `2p + 1`.

- `_dot_kernel` (tensor cores, every row count: x padded to `BLOCK_M >= 16` rows), computed
  transposed (`y.T = W @ x.T`: the weight tile is the MMA's long side). One and-or per pair of
  weights turns a word into bf16 (or fp16) pairs `MAGIC + q` of neighbouring columns
  (`_unpack16`: `(w >> 4p) & 0x000F000F | 0x43004300`, four per word, no float arithmetic and
  no per-nibble shuffling, Marlin's trick), laid out so that each thread holds eight
  consecutive K values of an output row (16-byte stores into the shared-memory operand tile).
  When a step lies inside one group (`POST_SCALE`), scale and offset are applied to the dot's
  float32 sums: `(sum(x * (MAGIC + q)) - MAGIC * sum(x)) * scale + sum(x) * offset`, so the
  weights cost no float work at all. Otherwise (a step spanning groups, float32 x) the tile is
  de-quantized in float32 and rounded once to x's dtype, as a de-quantized checkpoint is.
- `_gemv_kernel` (CUDA cores, `BLOCK_M <= 4`): the first design, kept for the sweep to compare:
  per word the eight `x_k * q_k` summed (nibbles read in place, `q | 0x4B000000` is the float
  `2^23 + q`), then `scale * sum + offset * sum(x)`, in a `[BLOCK_M, BLOCK_K / 8, BLOCK_N]`
  register tile reduced over K at the end. Its x loads are scalar (one per nibble per thread):
  on the H200 it streamed 0.3-0.7 TB/s.

Both walk the `s`-th of `SPLIT_K` slices of K in `BLOCK_K` steps, load each word once (16-byte
loads along N, evicted first), issue their first weight tile before `wait_for_inputs` (PDL),
and write float32 partial sums when `SPLIT_K > 1`, which the tile's last program (`FIXUP`) or
`gemv.split_k_sum` (a second launch) adds. Loop bounds
are `tl.constexpr`, so both run in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl
from pegboard.core.kernels.pdl import wait_for_inputs


@triton.jit
def _words(qw_ptr, kb, kw, offs_n, n_mask, N):
    """The `[BLOCK_K / 8, BLOCK_N]` words of the step at column `kb` (read once per call)."""
    ptrs = qw_ptr + (kb // 8 + kw)[:, None] * N + offs_n[None, :]
    return tl.load(ptrs, mask=n_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _start(qw_ptr, N, K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Both kernels' prologue for program `(m, n, s)`: `s`, its rows `offs_m`, its columns
    `offs_n` (and their mask), a step's word and column indices `kw` / `offs_k`, the first K
    column `k0` of its slice, and the first step's words, loaded before `wait_for_inputs`
    (weights depend on no earlier kernel). Inlined: the kernels compile to the same PTX as with
    these lines spelled out in each. Tile shapes and loop bounds (`KW`, `K_SPLIT`) must be
    `tl.constexpr` where they are used, so each kernel names its own."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kw = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    k0 = pid_s * (K // SPLIT_K)
    words = _words(qw_ptr, k0, kw, offs_n, n_mask, N)
    wait_for_inputs(PDL)
    return pid_s, offs_m, offs_n, n_mask, kw, offs_k, k0, words


@triton.jit
def _group_params(ptr, kb, kw, offs_n, n_mask, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales (or offsets) of the words `kw` of the step at column `kb`, as float32: one row
    `[1, BLOCK_N]` when the whole step lies in one group, else `[BLOCK_K / 8, BLOCK_N]`."""
    if GROUP % BLOCK_K == 0:
        row = tl.load(ptr + (kb // GROUP) * N + offs_n, mask=n_mask, other=0.0)
        return row.to(tl.float32)[None, :]
    else:
        g = (kb + kw * 8) // GROUP
        tile = tl.load(ptr + g[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0.0)
        return tile.to(tl.float32)


@triton.jit
def _store_out(y_ptr, b_ptr, acc, mask, offs_m, offs_n, N, stride_ym, HAS_BIAS: tl.constexpr):
    """The output rows: bias added in float32, rounded once to y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store(
    y_ptr,
    p_ptr,
    c_ptr,
    b_ptr,
    acc,
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
    pid_s,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,
):
    """Store a program's float32 sums: the output (one slice of K), or its partial sums
    `p_ptr [SPLIT_K, M, N]`. With `FIXUP` the last program of an output tile to finish (a
    counter per tile, `c_ptr`) adds the tile's partial sums in slice order (deterministic),
    writes the output and resets the counter to 0 for the next launch; without it
    `gemv.split_k_sum` does that in a second launch."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(p_ptr + pid_s * M * N + tile_offs, acc, mask=mask)
        if FIXUP:
            tile = c_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            tl.debug_barrier()  # every thread's partial sums written before the release below
            arrived = tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):  # L2 reads: written by other SMs
                    part = tl.load(p_ptr + s * M * N + tile_offs, mask=mask, cache_modifier=".cg")
                    total += part
                _store_out(y_ptr, b_ptr, total, mask, offs_m, offs_n, N, stride_ym, HAS_BIAS)
                tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")
    else:
        _store_out(y_ptr, b_ptr, acc, mask, offs_m, offs_n, N, stride_ym, HAS_BIAS)


@triton.jit
def _pair(words, SHIFT: tl.constexpr, MAGIC16: tl.constexpr, ASM: tl.constexpr):
    """Nibbles `SHIFT / 4` and `SHIFT / 4 + 4` of every word (columns `2p`, `2p + 1`) as the
    16-bit patterns `MAGIC16 | q`, joined along a new last axis: one shift and one and-or.
    `ASM` spells the and-or as one `lop3` (Triton 3.6 otherwise narrows the or past the
    16-bit truncation and emits two); the interpreter cannot run inline assembly."""
    if ASM:
        t = tl.inline_asm_elementwise(
            f"{{ .reg .b32 s; shr.u32 s, $1, {SHIFT}; "
            f"lop3.b32 $0, s, 983055, {MAGIC16 * 65537}, 0xEA; }}",  # (s & 0x000F000F) | magic
            "=r,r",
            [words],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        t = ((words >> SHIFT) & 0x000F000F) | (MAGIC16 * 65537)
    return tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))


@triton.jit
def _unpack16(words, MAGIC16: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """`[KW, BLOCK_N]` words -> `[BLOCK_N, 8 KW]` 16-bit floats `MAGIC + q` (column `8 kw + i`
    = column `i` of word `kw`): each thread keeps the eight K values of a word, consecutive, in
    its registers, so the operand tile is stored to shared memory 16 bytes at a time."""
    low = tl.join(_pair(words, 0, MAGIC16, ASM), _pair(words, 4, MAGIC16, ASM))  # [KW, N, h, p]
    high = tl.join(_pair(words, 8, MAGIC16, ASM), _pair(words, 12, MAGIC16, ASM))  # p = 2, 3
    q = tl.permute(tl.join(low, high), (1, 0, 4, 3, 2))  # [N, KW, p // 2, p % 2, h]
    return tl.reshape(q, (words.shape[1], words.shape[0] * 8)).to(DTYPE, bitcast=True)


@triton.jit
def _dot_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, p_ptr, c_ptr, M, N, stride_xm, stride_ym,
    K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    POST_SCALE: tl.constexpr, MAGIC16: tl.constexpr, MAGIC_VALUE: tl.constexpr,
    PRECISION: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    # Computed transposed, `y.T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] @ x.T`: the weights
    # are the MMA's long side (wgmma's 64-row M), x's few rows its short N side.
    pid_s, offs_m, offs_n, n_mask, kw, offs_k, k0, words = _start(
        qw_ptr, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, PDL)  # fmt: skip
    K_SPLIT: tl.constexpr = K // SPLIT_K
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None]  # [BLOCK_K, BLOCK_M]
    m_mask = (offs_m < M)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    STEPS: tl.constexpr = K_SPLIT // BLOCK_K
    for i in range(STEPS):
        kb = k0 + i * BLOCK_K
        current = words
        # the next step's words are in flight while this one is unpacked and multiplied (the
        # last step reloads its own: a cache hit, no branch)
        words = _words(qw_ptr, k0 + tl.minimum(i + 1, STEPS - 1) * BLOCK_K, kw, offs_n, n_mask, N)
        xt = tl.load(xt_ptrs + i * BLOCK_K, mask=m_mask, other=0.0)
        if POST_SCALE:  # 16-bit x, the step inside one group: no float work per weight
            qm = _unpack16(current, MAGIC16, xt.dtype, ASM)
            row = (kb // GROUP) * N + offs_n
            scale = tl.load(s_ptr + row, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            offset = tl.load(o_ptr + row, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            # sum(x) per row on the tensor cores too (a block of ones times x.T: exact products)
            ones = tl.full((16, BLOCK_K), 1.0, xt.dtype)
            x_sum = tl.max(tl.dot(ones, xt), axis=0)[None, :]
            xq = tl.dot(qm, xt) - MAGIC_VALUE * x_sum  # sum of q * x, exact products
            acc += xq * scale + x_sum * offset
        else:  # de-quantize the tile in float32, round once to x's dtype
            q = _unpack16(current, MAGIC16, tl.bfloat16, ASM).to(tl.float32) - MAGIC_VALUE
            g = offs_n[:, None] + ((kb + offs_k) // GROUP)[None, :] * N
            scale = tl.load(s_ptr + g, mask=n_mask[:, None], other=0.0).to(tl.float32)
            offset = tl.load(o_ptr + g, mask=n_mask[:, None], other=0.0).to(tl.float32)
            w = (q * scale + offset).to(xt.dtype)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _store(y_ptr, p_ptr, c_ptr, b_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_ym, pid_s,
           HAS_BIAS, SPLIT_K, FIXUP)  # fmt: skip


@triton.jit
def _nibble_in_place(words, J: tl.constexpr):
    """`q * 16^J` for nibble `J` (0-3) of every word, as float32 without shifting it down: one
    and-or (`2^23 + q * 16^J` as a float, exact below 2^24) and one subtraction."""
    bits = (words & (0xF << (4 * J))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, p_ptr, c_ptr, M, N, stride_xm, stride_ym,
    K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pid_s, offs_m, offs_n, n_mask, kw, _, k0, words = _start(
        qw_ptr, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, PDL)  # fmt: skip
    KW: tl.constexpr = BLOCK_K // 8
    K_SPLIT: tl.constexpr = K // SPLIT_K
    m_mask = (offs_m < M)[:, None]
    # x's column of word kw, nibble j: x_ptrs + 8 * kw + (the column nibble j holds)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + kw * 8)[None, :]
    acc = tl.zeros((BLOCK_M, KW, BLOCK_N), dtype=tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        kb = k0 + i * BLOCK_K
        if i > 0:
            words = _words(qw_ptr, kb, kw, offs_n, n_mask, N)
        scale = _group_params(s_ptr, kb, kw, offs_n, n_mask, N, GROUP, BLOCK_K)
        offset = _group_params(o_ptr, kb, kw, offs_n, n_mask, N, GROUP, BLOCK_K)
        dot = tl.zeros((BLOCK_M, KW, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, KW), dtype=tl.float32)
        high = words >> 16  # nibbles 4-7 in the low half: one shift per word, not per nibble
        for j in tl.static_range(8):
            column = 2 * (j % 4) + j // 4  # the interleaved serving order
            xj = tl.load(x_ptrs + i * BLOCK_K + column, mask=m_mask, other=0.0).to(tl.float32)
            x_sum += xj
            # nibble j unshifted is q * 16^(j % 4): its x scaled by 16^-(j % 4) (exact)
            if j >= 4:
                q_scaled = _nibble_in_place(high, j % 4)
            else:
                q_scaled = _nibble_in_place(words, j % 4)
            dot += (xj * (1.0 / (1 << (4 * (j % 4)))))[:, :, None] * q_scaled[None, :, :]
        acc += dot * scale[None, :, :] + x_sum[:, :, None] * offset[None, :, :]
    out = tl.sum(acc, axis=1)
    _store(y_ptr, p_ptr, c_ptr, b_ptr, out, offs_m, offs_n, M, N, stride_ym, pid_s,
           HAS_BIAS, SPLIT_K, FIXUP)  # fmt: skip
