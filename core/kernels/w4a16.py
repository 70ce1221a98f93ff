"""W4A16 matmul: `y = x @ W.T (+ bias)` with W stored as 4-bit values, activations bf16/fp16.

A decode step at small batch is bound by reading the weights; 4-bit weights are ~3.7x fewer
bytes than bf16 (group 128: 4 bits + 2 x 16 bits per 128 values). The weights come in the
serving layout of `pegboard.plugins.linear.int4` (packed at load): `qweight [K / 8, N]` int32,
eight input columns per word along K (column `k` in bits `4 * (k % 8)`), N contiguous;
`scales`, `offsets` `[K / group, N]`; `w = q * scale + offset`.

Program `(m, n, s)` owns `BLOCK_M` rows of x and `BLOCK_N` output columns and walks the `s`-th
of `SPLIT_K` slices of K in `BLOCK_K` steps. Each step loads a `[BLOCK_K / 8, BLOCK_N]` tile of
words once (each thread 16 contiguous bytes along N, marked evict-first so the weights do not
push x out of the cache) and the scales/offsets of their groups, then unpacks the eight nibbles
of every word in registers. A nibble becomes a float32 without an integer conversion: `q |
0x4B000000` is the float `2^23 + q`, minus `2^23` is `q` exactly. Two ways to multiply:

- `_gemv_kernel` (CUDA cores, `BLOCK_M <= 4`: decode's few rows). Per word it sums the eight
  `x_k * q_k` of that word's columns, then adds `scale * sum + offset * sum(x_k)` into a
  `[BLOCK_M, BLOCK_K / 8, BLOCK_N]` register tile that is summed over K once at the end (no
  cross-thread reduction in the loop). The weight is never materialised: a nibble is read in
  place (`q * 16^j`, with x scaled by `16^-j` instead) by one and-or and one add, then one
  multiply-add per row of x. Exact in float32 (the weights are not rounded to
  x's dtype), so its error against a bf16-rounded reference is bf16's own.
- `_dot_kernel` (tensor cores, more rows: batched decode, prefill), x's rows padded to
  `BLOCK_M` (16 at least). When a step lies inside one group and x is 16-bit, the nibbles
  become 16-bit floats by bit pattern alone (bf16 `0x4300 | q` reads as `128 + q`, exact), the
  dot sums `x * (128 + q)` exactly-multiplied in float32, and `(sum - 128 * sum(x)) * scale +
  sum(x) * offset` is added per step (~2^-19 relative cancellation, far below bf16's 2^-9).
  Otherwise the `[BLOCK_K, BLOCK_N]` tile is de-quantized in float32, rounded once to x's
  dtype (what a de-quantized checkpoint holds) and fed to `tl.dot`.

With `SPLIT_K > 1` each program writes float32 partial sums and `gemv.split_k_sum` adds them
and the bias (two passes: deterministic, no zeroing, CUDA-graph safe). With programmatic
dependent launch (Hopper, `pdl`) a program issues its first weight tile before it waits for
the kernel that writes x. Loop bounds are `tl.constexpr` (K is fixed per layer), so the kernels
also run in Triton's CPU interpreter (tests).

Launch configurations come from `w4a16_configs.json` (next to this file: per device name, per
`N x K g group` and rows of x rounded up to a power of two; written by
`scripts/bench_w4a16.py --sweep --write-table`), else from `default_config`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.gemv import split_k_sum
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs

GEMV_MAX_ROWS = 4  # `BLOCK_M` up to which the CUDA-core kernel runs
TABLE = Path(__file__).with_name("w4a16_configs.json")
#: Programs a launch aims at: two per SM of an H100/H200 (132 SMs), each a long K slice.
TARGET_PROGRAMS = 264
#: 16-bit patterns that read as `MAGIC + q` for a nibble q in the low bits, and that MAGIC:
#: bf16 0x4300 | q = 128 + q (7 mantissa bits), fp16 0x6400 | q = 1024 + q (10 bits).
MAGIC_16BIT = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@dataclass(frozen=True)
class W4A16Config:
    """One launch configuration (see the module docstring). `block_m <= GEMV_MAX_ROWS` runs the
    CUDA-core kernel, larger the tensor-core one."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = True

    @property
    def dot(self) -> bool:
        return self.block_m > GEMV_MAX_ROWS


@triton.jit
def _nibble_in_place(words, J: tl.constexpr):
    """`q * 16^J` for nibble `J` (0-3) of every word, as float32 without shifting it down: one
    and-or (`2^23 + q * 16^J` as a float, exact below 2^24) and one subtraction."""
    bits = (words & (0xF << (4 * J))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


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
def _words(qw_ptr, kb, kw, offs_n, n_mask, N):
    """The `[BLOCK_K / 8, BLOCK_N]` words of the step at column `kb` (read once per call)."""
    ptrs = qw_ptr + (kb // 8 + kw)[:, None] * N + offs_n[None, :]
    return tl.load(ptrs, mask=n_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _store(
    y_ptr,
    b_ptr,
    acc,
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
    pid_s,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        ptrs = y_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym,
    K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    KW: tl.constexpr = BLOCK_K // 8
    K_SPLIT: tl.constexpr = K // SPLIT_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m_mask = (offs_m < M)[:, None]
    kw = tl.arange(0, KW)
    k0 = pid_s * K_SPLIT
    words = _words(qw_ptr, k0, kw, offs_n, n_mask, N)
    wait_for_inputs(PDL)
    # x's columns of word kw, nibble j: x_ptrs + 8 * kw + j
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
            xj = tl.load(x_ptrs + i * BLOCK_K + j, mask=m_mask, other=0.0).to(tl.float32)
            x_sum += xj
            # nibble j unshifted is q * 16^(j % 4): its x scaled by 16^-(j % 4) (exact)
            if j >= 4:
                q_scaled = _nibble_in_place(high, j % 4)
            else:
                q_scaled = _nibble_in_place(words, j % 4)
            dot += (xj * (1.0 / (1 << (4 * (j % 4)))))[:, :, None] * q_scaled[None, :, :]
        acc += dot * scale[None, :, :] + x_sum[:, :, None] * offset[None, :, :]
    out = tl.sum(acc, axis=1)
    _store(y_ptr, b_ptr, out, offs_m, offs_n, M, N, stride_ym, pid_s, HAS_BIAS, SPLIT_K > 1)


@triton.jit
def _dot_kernel(
    x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym,
    K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    MAGIC16: tl.constexpr, MAGIC_VALUE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    KW: tl.constexpr = BLOCK_K // 8
    K_SPLIT: tl.constexpr = K // SPLIT_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m_mask = (offs_m < M)[:, None]
    kw = tl.arange(0, KW)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    k0 = pid_s * K_SPLIT
    words = _words(qw_ptr, k0, kw, offs_n, n_mask, N)
    wait_for_inputs(PDL)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        kb = k0 + i * BLOCK_K
        if i > 0:
            words = _words(qw_ptr, kb, kw, offs_n, n_mask, N)
        scale = _group_params(s_ptr, kb, kw, offs_n, n_mask, N, GROUP, BLOCK_K)
        offset = _group_params(o_ptr, kb, kw, offs_n, n_mask, N, GROUP, BLOCK_K)
        x = tl.load(x_ptrs + i * BLOCK_K, mask=m_mask, other=0.0)
        if MAGIC16 != 0:  # the step in one group, 16-bit x: scale after the dot
            bits = ((words[:, None, :] >> shifts) & 0xF) | MAGIC16  # [KW, 8, BLOCK_N]
            qm = tl.reshape(bits.to(tl.int16), (BLOCK_K, BLOCK_N)).to(x.dtype, bitcast=True)
            x_sum = tl.sum(x.to(tl.float32), axis=1)[:, None]
            xq = tl.dot(x, qm) - MAGIC_VALUE * x_sum  # sum of x * q, exact products
            acc += xq * scale + x_sum * offset
        else:
            bits = ((words[:, None, :] >> shifts) & 0xF) | 0x4B000000  # [KW, 8, BLOCK_N]
            q = bits.to(tl.float32, bitcast=True) - 8388608.0
            w = q * scale[:, None, :] + offset[:, None, :]
            w = tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x.dtype)  # rounded once, as a checkpoint
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    _store(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, pid_s, HAS_BIAS, SPLIT_K > 1)


def unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why the kernels cannot take a `[N, K]` layer with this group size (None if they can):
    K must be whole 32-column steps and groups whole words."""
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if group % 8:
        return f"group size {group} is not a multiple of 8"
    return None


def rows_bucket(m: int) -> int:
    """Rows of x as the configuration table keys them: the next power of two, at most 64."""
    return min(64, triton.next_power_of_2(max(1, m)))


def default_config(m: int, n: int, k: int, group: int | None = None) -> W4A16Config:
    """A launch configuration from first principles, where the measured table has none."""
    group = group or k
    if m <= 2:  # CUDA cores: per weight one and-or, one add, m multiply-adds
        block_m, block_n, block_k, stages = triton.next_power_of_2(m), 128, 128, 2
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n, block_k, stages = (128, 128, 3) if m <= 64 else (128, 64, 3)
    while k % block_k:
        block_k //= 2
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while programs * split < TARGET_PROGRAMS and k % (block_k * split * 2) == 0 and split < 16:
        split *= 2
    return W4A16Config(block_m, block_n, block_k, split, 4, stages)


@functools.cache
def _table() -> dict:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


def table_key(n: int, k: int, group: int) -> str:
    return f"{n}x{k}g{group}"


def pick_config(
    m: int, n: int, k: int, group: int | None = None, device: torch.device | None = None
) -> W4A16Config:
    """The launch configuration for `m` rows of x and a `[N, K]` layer: the measured one for
    this device (`w4a16_configs.json`) where there is one, else `default_config`."""
    if device is not None and device.type == "cuda" and group is not None:
        entry = (
            _table()
            .get(torch.cuda.get_device_name(device), {})
            .get(table_key(n, k, group), {})
            .get(str(rows_bucket(m)))
        )
        if entry is not None:
            cfg = W4A16Config(**entry)
            if m <= GEMV_MAX_ROWS or cfg.dot:
                return cfg
    return default_config(m, n, k, group)


def config_dict(cfg: W4A16Config) -> dict:
    """`cfg` as the configuration table stores it."""
    return asdict(cfg)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for the packed W (see the module docstring): x `[..., K]`, a new
    `[..., N]` tensor in x's dtype. Never synchronises with the host (CUDA-graph safe)."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or pick_config(m, n, k, group_size, x.device)
    if k % (cfg.block_k * cfg.split_k) or cfg.block_k % 8:
        raise ValueError(f"{cfg} does not divide K={k}")
    split = cfg.split_k
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    pdl = launch_options(x.device) if cfg.pdl else {"PDL": False}
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    extra = {}
    if cfg.dot:  # bf16/fp16 nibbles made by bit pattern when a step lies in one group
        magic = MAGIC_16BIT.get(x.dtype) if group_size % cfg.block_k == 0 else None
        extra = {
            "MAGIC16": magic[0] if magic else 0,
            "MAGIC_VALUE": magic[1] if magic else 0.0,
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",  # fp32 x: exact
        }
    kernel = _dot_kernel if cfg.dot else _gemv_kernel
    kernel[grid](
        x2,
        qweight,
        scales,
        offsets,
        bias if bias is not None else out,
        partial,
        m,
        n,
        x2.stride(0),
        out.stride(0),
        K=k,
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
        **extra,
    )
    if split > 1:
        split_k_sum(partial, bias, out, pdl)
    return out.view(*x.shape[:-1], n)
