"""Skinny GEMMs of decode batches: `y = x @ W.T (+ bias)` for 9 to 256 rows of x.

Between batch 1 (the GEMV kernels of `gemv.py`, up to 8 rows) and prefill (cuBLAS), a decode
step at batch 16-256 multiplies a few dozen to a few hundred rows by each weight. cuBLAS picks
tiles for large problems: on the H200 the Qwen3-0.6B layers at 256 rows took 6.4-7.8 µs each
(docs/benchmarks.md, session 7) where their weights (2-12 MB) stream in 1-3 µs and their
FLOPs take 1.4-4 µs. Its 64-128-column tiles leave N = 1,024 outputs as 8-16 column blocks,
so a few dozen SMs of 132 each stream a long slab of K while the rest idle.

Program `(m, n, s)` owns `BLOCK_M` rows of x and `BLOCK_N` output columns (weight rows) and
walks the `s`-th of `SPLIT_K` slices of K in `BLOCK_K` steps on tensor cores, in one of two
orientations (`SWAP`, chosen per configuration):

- `SWAP` (few rows): `y.T [BLOCK_N, BLOCK_M] = W_tile @ x_tile.T`: the weight rows are the
  MMA's long side (64-128: wgmma's M) and x's 16-64 rows its short side, as the GEMV's
  tensor-core kernel does for up to 8 rows;
- plain (more rows): `y [BLOCK_M, BLOCK_N] = x_tile @ W_tile.T`, an ordinary GEMM tile.

The m index varies fastest in the launch order, so the programs that share a weight tile run
together and read it from HBM once (L2 serves the others). With `SPLIT_K > 1` every program
writes float32 partial sums `[SPLIT_K, M, N]` and `gemv.split_k_sum` adds them in slice order
(deterministic, no atomics) with the bias in a second launch. Weight rows past N are
clamped to the last row (their results are never stored), so the weight loads need a mask only
where K is not whole `BLOCK_K * SPLIT_K` steps; x rows past M read zeros. On Hopper the kernel launches with
programmatic dependent launch (`pdl`): a program issues its first weight tile before it waits
for the kernel that writes x. Numerics as `gemv`: float32 sums (tensor cores take float32
inputs at full precision), bias added in float32, one rounding to x's dtype.

Which configuration runs depends on the weight's shape and the rows of x, rounded up to a
power of two (`rows_bucket`: 16, 32, 64, 128, 256). `measured_config` reads them from
`skinny_gemm_configs.json` (next to this file, or the file `PEGBOARD_SKINNY_GEMM_CONFIGS`
names; "off" reads none): per device name, per weight dtype, per `N x K`, per bucket, a
configuration, or null where cuBLAS was as fast (written by `scripts/bench_skinny_gemm.py
--sweep --write-table`). Without an entry `dense.linear` keeps `F.linear`: a shape or device
nobody measured runs exactly as before. Nothing here synchronises with the host or allocates
beyond the output (and the split-K partials), so calls are captured in CUDA graphs once each
launch configuration has been compiled (the warm-up run before a capture does that).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.gemv import (
    _store_rows,
    _weight_tile,
    _x_tile,
    k_slices,
    rows_and_output,
    split_k_sum,
)
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs

MIN_ROWS, MAX_ROWS = 9, 256  # rows of x this kernel is considered for (the GEMV owns 1-8)
BUCKETS = (16, 32, 64, 128, 256)  # the table's row buckets: rows up to each
TABLE = Path(__file__).with_name("skinny_gemm_configs.json")
TABLE_ENV = "PEGBOARD_SKINNY_GEMM_CONFIGS"


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration: rows of x, output columns and K width per program step, the
    number of K slices, the orientation of the product (`swap`: weight rows as the MMA's long
    side), Triton's warps and pipelining depth, and programmatic dependent launch (`pdl`)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    swap: bool = False
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = True


@triton.jit
def _mma(w, x, acc, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    """`acc + w @ x.T` (`SWAP`, `[BLOCK_N, BLOCK_M]`) or `acc + x @ w.T` (`[BLOCK_M, BLOCK_N]`)
    on tensor cores, in float32, x rounded to the weight's dtype first."""
    x = x.to(w.dtype)
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _skinny_kernel(
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
    SWAP: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N read row N - 1 (never stored): the weight loads need no row mask.
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    m_mask = offs_m[:, None] < M
    w_ptrs = W + rows_w[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The first weight tile is loading while the kernel before finishes.
    w = _weight_tile(w_ptrs, offs_k[None, :], K, EVEN_K)
    wait_for_inputs(PDL)
    x = _x_tile(x_ptrs, offs_k[None, :], K, m_mask, EVEN_K)
    acc = _mma(w, x, acc, SWAP, PRECISION)
    for k in range(BLOCK_K, k_per_split, BLOCK_K):
        w = _weight_tile(w_ptrs + k, offs_k[None, :] + k, K, EVEN_K)
        x = _x_tile(x_ptrs + k, offs_k[None, :] + k, K, m_mask, EVEN_K)
        acc = _mma(w, x, acc, SWAP, PRECISION)
    if SWAP:
        acc = tl.trans(acc)
    _store_rows(acc, offs_m, offs_n, pid_k, M, N, Bias, Out, Partial, stride_om, HAS_BIAS, SPLIT)


def skinny_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyConfig
) -> torch.Tensor:
    """`x @ weight.T + bias` with `config`: x `[..., K]` (a unit stride along K), weight
    `[N, K]` contiguous, bias `[N]` or None; a new `[..., N]` tensor in x's dtype."""
    if min(config.block_m, config.block_n, config.block_k) < 16:
        raise ValueError(f"{config}: tensor-core tiles are at least 16 wide on every side")
    x2, out = rows_and_output(x, weight, "skinny_gemm")
    (m, k), n = x2.shape, weight.shape[0]
    if m == 0:
        return out.view(*x.shape[:-1], n)
    block_k = min(config.block_k, max(16, triton.next_power_of_2(k)))
    k_per_split, splits, partial = k_slices(k, block_k, config.split_k, out)
    pdl = launch_options(x.device) if config.pdl else {"PDL": False}
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    _skinny_kernel[grid](
        x2,
        weight,
        bias if bias is not None else out,
        out,
        partial,
        m,
        n,
        k,
        k_per_split,
        x2.stride(0),
        out.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        SWAP=config.swap,
        EVEN_K=k % k_per_split == 0,
        HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl,
    )
    if splits > 1:
        split_k_sum(partial, bias, out, pdl)
    return out.view(*x.shape[:-1], n)


def rows_bucket(rows: int) -> int | None:
    """The table's row bucket for `rows` rows of x (the next power of two from 16), or None
    outside `MIN_ROWS..MAX_ROWS`."""
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return None
    return max(BUCKETS[0], triton.next_power_of_2(rows))


Configs = dict[tuple[torch.dtype, int, int], dict[int, SkinnyConfig | None]]
#: The measured configurations of each device, read from the table at the first use.
_by_device: dict[torch.device, Configs] = {}


def table_path() -> Path | None:
    """The configuration table to read: `PEGBOARD_SKINNY_GEMM_CONFIGS` (None for "off", "0",
    "none" or empty), else `skinny_gemm_configs.json` next to this file."""
    value = os.environ.get(TABLE_ENV)
    if value is None:
        return TABLE
    return None if value.strip().lower() in ("", "0", "off", "none") else Path(value)


def parse_table(table: dict, device_name: str) -> Configs:
    """`device_name`'s entries of a configuration table (see the module docstring)."""
    configs: Configs = {}
    for dtype_name, shapes in table.get(device_name, {}).items():
        dtype = getattr(torch, dtype_name)
        for shape, by_bucket in shapes.items():
            n, k = (int(v) for v in shape.split("x"))
            configs[(dtype, n, k)] = {
                int(bucket): SkinnyConfig(**entry) if entry is not None else None
                for bucket, entry in by_bucket.items()
            }
    return configs


def read_table(path: Path | None) -> dict:
    """The table at `path` ({} for None or a missing file); a malformed file is an error that
    names it."""
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{TABLE_ENV} / skinny GEMM table {path}: {e}") from e


def device_configs(device: torch.device) -> Configs:
    """The measured configurations for `device` (empty off CUDA or without a table entry)."""
    configs = _by_device.get(device)
    if configs is None:
        configs = {}
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            configs = parse_table(read_table(table_path()), name)
        _by_device[device] = configs
    return configs


def reload_table() -> None:
    """Forget the configurations read so far (the next call reads the table again)."""
    _by_device.clear()


def measured_config(rows: int, weight: torch.Tensor) -> SkinnyConfig | None:
    """The measured configuration for `rows` rows of x times `weight`, or None (cuBLAS)."""
    bucket = rows_bucket(rows)
    if bucket is None:
        return None
    n, k = weight.shape
    by_bucket = device_configs(weight.device).get((weight.dtype, n, k))
    return by_bucket.get(bucket) if by_bucket else None


def table_entry(config: SkinnyConfig | None) -> dict | None:
    """`config` as the table stores it."""
    return asdict(config) if config is not None else None


def table_key(n: int, k: int) -> str:
    return f"{n}x{k}"
