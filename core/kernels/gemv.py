"""Matrix-vector products of decode: `y = x @ W.T (+ bias)` for a few rows of x.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the
weights once (Llama-3.1-8B: 15 GB per token); cuBLAS streams them at ~2.55 TB/s on an H100,
where a device copy reaches ~3.0 TB/s. These kernels aim at the copy rate.

Program `(n, s)` owns `BLOCK_N` output rows (weight rows) and walks the `s`-th of `SPLIT_K`
slices of K in `BLOCK_K`-wide steps; each thread loads 8 consecutive bf16 weights (16 bytes)
at a time, and the weight loads are marked to be evicted first, so they do not push x out of
the cache. On Hopper the kernels launch with programmatic dependent launch (`pdl`): a program
issues its first weight tile before it waits for the kernel that writes x, so the launch and
the first loads overlap the end of the kernel before. Two ways to multiply, chosen per shape:

- `_gemv_kernel` (CUDA cores): float32 products accumulate element-wise in a
  `[BLOCK_M, BLOCK_N, BLOCK_K]` register tile that is summed over K once at the end, so the
  loop does no cross-thread reduction; best at one or two rows.
- `_dot_kernel` (tensor cores): `W_tile @ x_tile.T`, the weight rows as the dot's M side and
  the x rows, padded to 16, as its N side; for more rows, where the element-wise products
  would cost more than the loads.

With `SPLIT_K > 1` (for shapes with few output rows, so that enough programs stream at once)
each program writes float32 partial sums, and `_split_k_sum_kernel` adds them (and the bias)
into the output. Bias is added in float32 before the one rounding to the output dtype.

Which kernel and blocks to use depends on the shape and the number of rows; `linear` takes
them from `DECODE_CONFIGS` (measured on the H100 against cuBLAS, see there) and falls back to
`F.linear` where a shape has no entry or cuBLAS was faster. Nothing here synchronises with the
host or allocates beyond the output (and the split-K partials), so calls can be captured in a
CUDA graph once each launch configuration has been compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.gemv_silu import paired_rows, silu_mul, store_silu
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs
from torch.nn import functional as F

MAX_ROWS = 8  # rows of x (tokens) up to which `linear` considers these kernels


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration: the output rows and K width per program step, the number of
    K slices, tensor cores or not, Triton's warps and pipelining depth, and whether to launch
    with programmatic dependent launch where the device has it (`pdl`)."""

    block_n: int
    block_k: int
    split_k: int = 1
    dot: bool = False
    num_warps: int = 4
    num_stages: int = 1
    pdl: bool = True


@triton.jit
def _store_rows(
    acc,
    offs_m,
    offs_n,
    pid_k,
    M,
    N,
    Bias,
    Out,
    Partial,
    stride_om,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Store `acc [BLOCK_M, BLOCK_N]` (float32): partial sums of K slice `pid_k`, or the
    output rows with the bias added and rounded."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        partial = Partial + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(partial, acc, mask=mask)
    else:
        if HAS_BIAS:
            bias = tl.load(Bias + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out = Out + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _weight_tile(ptrs, k_offs, K, EVEN_K: tl.constexpr):
    """A weight tile, evicted from the cache first (read once per call); `k_offs`, broadcast to
    the tile, masks K unless `EVEN_K`."""
    if EVEN_K:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=k_offs < K, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _x_tile(ptrs, k_offs, K, m_mask, EVEN_K: tl.constexpr):
    """A tile of x, zero in rows past M (`m_mask`) and, unless `EVEN_K`, past K."""
    if EVEN_K:
        x = tl.load(ptrs, mask=m_mask, other=0.0)
    else:
        x = tl.load(ptrs, mask=m_mask & (k_offs < K), other=0.0)
    return x


@triton.jit
def _input_tile(ptrs, k_offs, K, m_mask, EVEN_K: tl.constexpr, GATE_UP: tl.constexpr):
    """A tile of the input rows; with `GATE_UP`, of `silu(gate) * up` computed from the
    gate/up rows (`ptrs` at gate, up K further on), rounded as `activation.silu_and_mul`
    rounds its output: SiLU in float32 rounded to the activation dtype, the product again."""
    if GATE_UP:
        gate = _x_tile(ptrs, k_offs, K, m_mask, EVEN_K)
        x = silu_mul(gate, _x_tile(ptrs + K, k_offs, K, m_mask, EVEN_K))
    else:
        x = _x_tile(ptrs, k_offs, K, m_mask, EVEN_K)
    return x


@triton.jit
def _gemv_kernel(
    X,
    W,
    Bias,
    Out,
    Partial,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    GATE_UP: tl.constexpr,
    SILU_OUT: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N - 1 (their results are not stored): the weight loads need no mask.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    if SILU_OUT:  # gate rows and their up rows (`gemv_silu`)
        rows = paired_rows(pid_n, N, BLOCK_N).to(tl.int64)
    k_offs = (pid_k * k_per_split + tl.arange(0, BLOCK_K))[None, None, :]
    w_ptrs = W + rows[None, :, None] * K + k_offs
    x_ptrs = X + offs_m[:, None, None] * stride_xm + k_offs
    m_mask = offs_m[:, None, None] < M
    # The first weight tile is loading while the kernel before finishes.
    w = _weight_tile(w_ptrs, k_offs, K, EVEN_K)
    wait_for_inputs(PDL)
    x = _input_tile(x_ptrs, k_offs, K, m_mask, EVEN_K, GATE_UP)
    acc = x.to(tl.float32) * w.to(tl.float32)  # [BLOCK_M, BLOCK_N, BLOCK_K], summed at the end
    for k in range(BLOCK_K, k_per_split, BLOCK_K):
        w = _weight_tile(w_ptrs + k, k_offs + k, K, EVEN_K)
        x = _input_tile(x_ptrs + k, k_offs + k, K, m_mask, EVEN_K, GATE_UP)
        acc += x.to(tl.float32) * w.to(tl.float32)
    acc_mn = tl.sum(acc, axis=2)
    if SILU_OUT:
        store_silu(acc_mn, offs_m, pid_n, M, N, Bias, Out, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        _store_rows(
            acc_mn, offs_m, offs_n, pid_k, M, N, Bias, Out, Partial, stride_om, HAS_BIAS, SPLIT
        )


@triton.jit
def _dot_kernel(
    X,
    W,
    Bias,
    Out,
    Partial,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    GATE_UP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_offs = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None] * K + k_offs[None, :]  # [BLOCK_N, BLOCK_K]
    xt_ptrs = X + offs_m[None, :] * stride_xm + k_offs[:, None]  # [BLOCK_K, BLOCK_M]
    m_mask = offs_m[None, :] < M
    w = _weight_tile(w_ptrs, k_offs[None, :], K, EVEN_K)
    wait_for_inputs(PDL)
    xt = _input_tile(xt_ptrs, k_offs[:, None], K, m_mask, EVEN_K, GATE_UP)
    acc = tl.dot(w, xt.to(w.dtype), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
    for k in range(BLOCK_K, k_per_split, BLOCK_K):
        w = _weight_tile(w_ptrs + k, k_offs[None, :] + k, K, EVEN_K)
        xt = _input_tile(xt_ptrs + k, k_offs[:, None] + k, K, m_mask, EVEN_K, GATE_UP)
        acc = tl.dot(w, xt.to(w.dtype), acc, input_precision=PRECISION)
    _store_rows(
        tl.trans(acc),
        offs_m,
        offs_n,
        pid_k,
        M,
        N,
        Bias,
        Out,
        Partial,
        stride_om,
        HAS_BIAS,
        SPLIT,
    )


@triton.jit
def _split_k_sum_kernel(
    Partial,
    Bias,
    Out,
    M,
    N,
    stride_om,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    wait_for_inputs(PDL)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(Partial + (s * M + row) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_om + offs, acc.to(Out.dtype.element_ty), mask=mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig,
    out: torch.Tensor | None = None,
    gate_up: bool = False,
    silu_out: bool = False,
) -> torch.Tensor:
    """`x @ weight.T + bias` with `config`: x `[..., K]` (a unit stride along K), weight
    `[N, K]` contiguous, bias `[N]` or None; a new `[..., N]` tensor in x's dtype, or written
    into `out` (`[rows of x, N]`, x's dtype, a unit stride along N). Accumulates in float32
    (tensor cores take float32 inputs at full precision).

    With `gate_up`, x is a SwiGLU gate/up projection's output `[..., 2 * K]` (gate first) and
    the input rows are `silu(gate) * up`, computed per K block inside the kernel and rounded
    exactly as `activation.silu_and_mul` rounds them: the result equals
    `gemv(silu_and_mul(x), ...)` bit for bit, one launch and one `[rows, K]` tensor fewer.

    With `silu_out`, weight is a SwiGLU gate/up projection `[2 * I, K]` (gate rows first) and
    the result is `silu_and_mul(gemv(x, weight, bias))`, `[..., I]`, bit for bit, computed in
    the kernel's epilogue (`gemv_silu`; the element-wise kernel, one K slice, even `block_n`)."""
    if silu_out:
        if config.dot or config.split_k > 1 or config.block_n % 2 or gate_up:
            raise ValueError(f"gemv: silu_out needs an element-wise, unsplit config, not {config}")
        return _gemv_silu(x, weight, bias, config)
    x2, out = rows_and_output(x, weight, "gemv", out, gate_up)
    m, n, k = x2.shape[0], weight.shape[0], weight.shape[1]
    if m == 0:
        return out.view(*x.shape[:-1], n)
    block_k = min(config.block_k, triton.next_power_of_2(k))
    k_per_split, splits, partial = k_slices(k, block_k, config.split_k, out)
    args = (x2, weight, bias if bias is not None else out, out, partial, m, n, k, k_per_split)
    pdl = launch_options(x.device) if config.pdl else {"PDL": False}
    common = {
        **pdl,
        "BLOCK_N": config.block_n,
        "BLOCK_K": block_k,
        "EVEN_K": k % k_per_split == 0,
        "HAS_BIAS": bias is not None,
        "SPLIT": splits > 1,
        "GATE_UP": gate_up,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    grid = (triton.cdiv(n, config.block_n), splits)
    if config.dot:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        block_m = max(16, triton.next_power_of_2(m))
        _dot_kernel[grid](
            *args, x2.stride(0), out.stride(0), BLOCK_M=block_m, PRECISION=precision, **common
        )
    else:
        block_m = triton.next_power_of_2(m)
        _gemv_kernel[grid](*args, x2.stride(0), out.stride(0), BLOCK_M=block_m, **common)
    if splits > 1:
        split_k_sum(partial, bias, out, pdl)
    return out.view(*x.shape[:-1], n)


def _gemv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
) -> torch.Tensor:
    """`gemv(..., silu_out=True)`: one launch of `_gemv_kernel` in its `SILU_OUT` mode."""
    n, k = weight.shape
    if n % 2:
        raise ValueError(f"gemv: silu_out needs a gate/up weight of even rows, not {n}")
    x2, _ = rows_and_output(x, weight, "gemv", None)
    m = x2.shape[0]
    out = torch.empty(m, n // 2, dtype=x.dtype, device=x.device)
    if m:
        block_k = min(config.block_k, triton.next_power_of_2(k))
        pdl = launch_options(x.device) if config.pdl else {"PDL": False}
        k_per_split = triton.cdiv(k, block_k) * block_k  # one slice (`k_slices`)
        _gemv_kernel[(triton.cdiv(n // 2, config.block_n // 2), 1)](
            x2, weight, bias if bias is not None else out, out, out, m, n, k, k_per_split,
            x2.stride(0), out.stride(0), BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=config.block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
            HAS_BIAS=bias is not None, SPLIT=False, GATE_UP=False, SILU_OUT=True,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n // 2)


def rows_and_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel: str,
    out: torch.Tensor | None = None,
    gate_up: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For `x @ weight.T`: x as `[M, K]` rows (`[M, 2 * K]` gate/up rows with `gate_up`) with a
    unit stride along K, and the `[M, N]` output: `out` if given (checked: x's dtype, a unit
    stride along N), else a new one in x's dtype; the weight must be a contiguous `[N, K]`
    (errors name `kernel`)."""
    n, k = weight.shape
    width = 2 * k if gate_up else k
    if x.shape[-1] != width:
        raise ValueError(f"{kernel}: x has {x.shape[-1]} columns, the weight takes {width}")
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not weight.is_contiguous():
        raise ValueError(f"{kernel} needs a contiguous [N, K] weight")
    m = x2.shape[0]
    if out is None:
        return x2, torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"{kernel}: out must be [{m}, {n}] {x.dtype} with a unit stride along N")
    return x2, out


def k_slices(
    k: int, block_k: int, split_k: int, out: torch.Tensor
) -> tuple[int, int, torch.Tensor]:
    """K split into at most `split_k` slices of whole `block_k` steps: the K per slice, the
    number of slices, and the float32 partial sums `[slices, M, N]` they write (`out` itself
    when there is one slice)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        return k_per_split, 1, out
    m, n = out.shape
    return k_per_split, splits, torch.empty(splits, m, n, dtype=torch.float32, device=out.device)


def split_k_sum(
    partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, pdl: dict[str, bool]
) -> None:
    """`out [M, N] = partial.sum(0) + bias` for float32 partial sums `[splits, M, N]` (the
    split-K kernels' second pass; also used by `w4a16`)."""
    splits, m, n = partial.shape
    block = min(1024, triton.next_power_of_2(n))
    _split_k_sum_kernel[(m, triton.cdiv(n, block))](
        partial,
        bias if bias is not None else out,
        out,
        m,
        n,
        out.stride(0),
        SPLITS=splits,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
        **pdl,
    )


# Launch configurations for decode, by (weight dtype, N, K) and rows of x rounded up to a power
# of two; None: cuBLAS was faster there. Chosen by `scripts/bench_gemv.py --sweep` on an H100
# 80GB HBM3 (torch 2.11, triton 3.6, 2026-11-21). The comments give, per shape, cuBLAS -> this
# configuration in µs at 1, 2, 4, 8 rows (`bench_gemv.py`: CUDA-graph replays of one shape,
# weights cold in the cache, PDL on). In a whole Llama-3.1-8B step (`bench_gemv.py` step: all
# layers' linears in one graph) the tensor-core kernel ran slower with PDL than without
# (8 rows: 5.90 vs 5.55 ms, cuBLAS 5.70; not explained yet, perhaps its 96-128 programs,
# launched early, land unevenly on the SMs), while Qwen3-0.6B's small shapes gain from PDL
# (8 rows: 0.83 vs 0.89 ms, cuBLAS 0.85). So Llama's tensor-core entries launch without it.
_DOT_64 = GemvConfig(64, 128, dot=True, num_stages=4)
_DOT_64_NO_PDL = GemvConfig(64, 128, dot=True, num_stages=4, pdl=False)
_DOT_32_NO_PDL = GemvConfig(32, 256, dot=True, num_stages=4, pdl=False)
DECODE_CONFIGS: dict[tuple[torch.dtype, int, int], dict[int, GemvConfig | None]] = {
    # Llama-3.1-8B qkv: 21.3 -> 17.5, 21.0 -> 20.2, 21.2 -> 20.2, 21.0 -> 20.3
    (torch.bfloat16, 6144, 4096): {
        1: GemvConfig(4, 1024),
        2: _DOT_64_NO_PDL,
        4: _DOT_64_NO_PDL,
        8: _DOT_64_NO_PDL,
    },
    # o: 16.5 -> 12.1, 16.7 -> 12.7, 16.6 -> 14.7, 16.8 -> 14.8
    (torch.bfloat16, 4096, 4096): {
        1: GemvConfig(2, 2048),
        2: GemvConfig(4, 1024),
        4: _DOT_32_NO_PDL,
        8: _DOT_32_NO_PDL,
    },
    # gate_up: 84.9 -> 78.9, 84.6 -> 82.1, 85.1 -> 83.2, 86.1 -> 82.7
    (torch.bfloat16, 28672, 4096): {
        1: GemvConfig(4, 1024),
        2: GemvConfig(4, 1024),
        4: _DOT_64_NO_PDL,
        8: _DOT_64_NO_PDL,
    },
    # down: 45.5 -> 40.2, 44.9 -> 42.0, 46.0 -> 45.4, 46.1 -> 45.5 (the last two are within 2 %,
    # but the whole step at 4 and 8 rows is 3 % faster with them)
    (torch.bfloat16, 4096, 14336): {
        1: GemvConfig(2, 2048),
        2: GemvConfig(2, 2048),
        4: _DOT_32_NO_PDL,
        8: _DOT_32_NO_PDL,
    },
    # LM head: 376.4 -> 335.0, 376.8 -> 344.4, 377.8 -> 348.5, 378.9 -> 357.5
    (torch.bfloat16, 128256, 4096): {
        1: GemvConfig(2, 2048),
        2: GemvConfig(4, 1024),
        4: _DOT_64_NO_PDL,
        8: GemvConfig(16, 512, dot=True, num_stages=3, pdl=False),
    },
    # Llama-3.1-8B, one rank of TP=2 (H200, 2026-11-30, `bench_gemv.py --sweep --tp 2`):
    # qkv: 11.5 -> 7.0, 12.0 -> 9.0, 12.1 -> 9.9, 11.9 -> 9.9
    (torch.bfloat16, 3072, 4096): {
        1: GemvConfig(4, 1024),
        2: GemvConfig(2, 2048),
        4: GemvConfig(64, 128, split_k=4, dot=True, num_stages=4),
        8: GemvConfig(64, 128, split_k=4, dot=True, num_stages=4),
    },
    # o: 7.2 -> 4.9, 7.2 -> 6.2, 7.1 -> 6.9, 7.1 -> 6.9
    (torch.bfloat16, 4096, 2048): {
        1: GemvConfig(8, 1024),
        2: GemvConfig(4, 1024),
        4: GemvConfig(32, 256, dot=True, num_stages=4),
        8: GemvConfig(32, 256, dot=True, num_stages=4),
    },
    # gate_up: 31.4 -> 28.0; at 2-8 rows cuBLAS is as fast (30.7 vs 30.8-31.5)
    (torch.bfloat16, 14336, 4096): {1: GemvConfig(4, 1024), 2: None, 4: None, 8: None},
    # down: 19.8 -> 15.4, 20.2 -> 16.3, 20.2 -> 17.8, 20.5 -> 18.2
    (torch.bfloat16, 4096, 7168): {
        1: GemvConfig(8, 1024),
        2: GemvConfig(4, 1024),
        4: GemvConfig(64, 128, split_k=4, dot=True, num_stages=4),
        8: GemvConfig(64, 128, split_k=4, dot=True, num_stages=4),
    },
    # LM head (vocab-parallel half): 130.6 -> 118.7, 128.2 -> 120.7, 129.5 -> 122.0, 130.6 -> 122.5
    (torch.bfloat16, 64128, 4096): {1: GemvConfig(2, 2048), 2: _DOT_64, 4: _DOT_64, 8: _DOT_64},
    # Qwen3-0.6B qkv: 5.7 -> 4.3, 5.7 -> 4.6, 5.7 -> 5.0, 5.7 -> 5.1
    (torch.bfloat16, 4096, 1024): {
        1: GemvConfig(4, 1024),
        2: GemvConfig(2, 2048),
        4: _DOT_64,
        8: _DOT_64,
    },
    # o: 5.8 -> 2.4, 5.8 -> 2.5, 5.8 -> 3.3; 8 rows: cuBLAS 5.8, best GEMV 6.0 (sweep)
    (torch.bfloat16, 1024, 2048): {
        1: GemvConfig(2, 2048),
        2: GemvConfig(2, 2048),
        4: GemvConfig(2, 1024),
        8: None,
    },
    # gate_up: 7.1 -> 5.1, 7.1 -> 6.2, 7.1 -> 6.2, 7.1 -> 6.2
    (torch.bfloat16, 6144, 1024): {1: GemvConfig(4, 2048), 2: _DOT_64, 4: _DOT_64, 8: _DOT_64},
    # down: 7.8 -> 3.7, 7.6 -> 3.6, 7.9 -> 4.1, 7.9 -> 6.5
    (torch.bfloat16, 1024, 3072): {
        1: GemvConfig(4, 1024),
        2: GemvConfig(2, 2048),
        4: GemvConfig(2, 1024),
        8: GemvConfig(32, 256, split_k=4, dot=True, num_stages=4),
    },
    # LM head (the tied embedding): 115.3 -> 102.9, 116.2 -> 107.7, 116.8 -> 109.3, 118.1 -> 110.6
    (torch.bfloat16, 151936, 1024): {1: GemvConfig(4, 2048), 2: _DOT_64, 4: _DOT_64, 8: _DOT_64},
    # SmolLM2-135M (H200, session 13: `CONFIGS=smollm2-135m ROWS=1,2,4,8 device-run.sh
    # gemv-sweep`; batch-1 decode, EAGLE verify rows): qkv 4.0 -> 1.3, 4.0 -> 1.5, 3.9 -> 1.8,
    # 3.7 -> 2.8
    (torch.bfloat16, 960, 576): {
        1: GemvConfig(8, 1024, split_k=2),
        2: GemvConfig(4, 1024, split_k=2),
        4: GemvConfig(2, 1024, split_k=2),
        8: GemvConfig(32, 256, dot=True, num_stages=4),
    },
    # o: 3.5 -> 1.2, 3.4 -> 1.2, 3.5 -> 1.9, 3.5 -> 2.5
    (torch.bfloat16, 576, 576): {
        1: GemvConfig(2, 2048),
        2: GemvConfig(4, 1024, split_k=4),
        4: GemvConfig(2, 1024),
        8: _DOT_64,
    },
    # gate_up: 4.1 -> 2.0, 4.1 -> 3.1, 4.1 -> 3.2, 4.1 -> 3.2
    (torch.bfloat16, 3072, 576): {
        1: GemvConfig(8, 1024),
        2: GemvConfig(2, 2048),
        4: _DOT_64,
        8: _DOT_64,
    },
    # down: 5.2 -> 1.4, 5.1 -> 1.9, 5.2 -> 2.6, 5.0 -> 3.9
    (torch.bfloat16, 576, 1536): {
        1: GemvConfig(4, 2048),
        2: GemvConfig(4, 2048, num_warps=8),
        4: GemvConfig(2, 1024),
        8: GemvConfig(16, 512, split_k=4, dot=True, num_stages=3),
    },
    # (the LM head, 49152 x 576: cuBLAS 16.6-17.0 us, the best GEMV 18.4-20.1: no entry)
    # SmolLM2-135M's EAGLE-3 head (H200, session 15: `CONFIGS=smollm2-135m-eagle3 ROWS=1,8
    # device-run.sh gemv-sweep`; 1 row: a draft step at batch 1, 8: a catch-up of k + 1 rows):
    # q/k/v over [embedding, hidden] 5.5 -> 1.6, 4.6 -> 3.8
    (torch.bfloat16, 960, 1152): {
        1: GemvConfig(4, 2048, split_k=2),
        8: _DOT_64,
    },
    # fc over the three target features: 5.5 -> 1.4, 5.2 -> 4.4
    (torch.bfloat16, 576, 1728): {
        1: GemvConfig(4, 2048, split_k=4),
        8: GemvConfig(1, 1024),
    },
}


def num_rows(x: torch.Tensor) -> int:
    """Rows of `x [..., K]` as a linear layer sees them (0 for an empty K)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def decode_config(rows: int, weight: torch.Tensor) -> GemvConfig | None:
    """The measured configuration for `rows` rows of x times `weight`, or None (use cuBLAS)."""
    if not 1 <= rows <= MAX_ROWS:
        return None
    n, k = weight.shape
    return DECODE_CONFIGS.get((weight.dtype, n, k), {}).get(triton.next_power_of_2(rows))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `gemv` where `DECODE_CONFIGS` has a configuration
    faster than cuBLAS for this weight and this many rows of x; with `out` (`[rows of x, N]`),
    written there (a tensor-parallel projection writing into the symmetric buffer)."""
    config = decode_config(num_rows(x), weight)
    if config is None or not weight.is_contiguous():
        if out is None:
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if bias is None:
            return torch.mm(x2, weight.t(), out=out)
        return torch.addmm(bias, x2, weight.t(), out=out)  # as F.linear: one rounding
    if out is None:
        return gemv(x, weight, bias, config)
    return gemv(x, weight, bias, config, out=out)
