"""W4A16 matmul: `y = x @ W.T (+ bias)` with W stored as 4-bit values, activations bf16/fp16.

A decode step at small batch is bound by reading the weights; 4-bit weights are ~3.7x fewer
bytes than bf16 (group 128: 4 bits + 2 x 16 bits per 128 values). The weights come in the
serving layout of `pegboard.plugins.linear.int4` (packed at load, whatever the checkpoint
format): `qweight [K / 8, N]` int32, eight input columns per word, N contiguous, the columns of
a word interleaved (nibbles `p`, `p + 4` hold columns `2p`, `2p + 1`); `scales`, `offsets`
`[K / group, N]`; `w = q * scale + offset`.

The kernels (`w4a16_kernels.py`): `_dot_kernel` on tensor cores for every row count (decode's
one row padded to 16: the tensor cores have the headroom, the CUDA cores do not), turning each
word into four bf16 pairs with one and-or each and applying scale and offset to the dot's
sums; `_gemv_kernel` on CUDA cores for up to 4 rows, the first design, kept as a candidate for
the sweep. Program `(m, n, s)` owns `BLOCK_M` rows of x and `BLOCK_N` output columns and walks
the `s`-th of `SPLIT_K` slices of K in `BLOCK_K` steps; with `SPLIT_K > 1` each program writes
float32 partial sums, and either the last program of each output tile adds them and the bias
(`fixup`: a counter per tile, reset by that program, so no zeroing launch) or
`gemv.split_k_sum` does in a second launch; both sum in slice order (deterministic) and are
CUDA-graph safe. With programmatic dependent launch (Hopper, `pdl`) a program
issues its first weight tile before it waits for the kernel that writes x.

Launch configurations come from `w4a16_configs.json` (next to this file, or the file named by
`PEGBOARD_W4A16_CONFIGS`: per device name, per `N x K g group` and rows of x rounded up to a
power of two; written by `scripts/bench_w4a16.py --sweep --write-table`), else from
`default_config`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from pegboard.core.kernels.cuda_support import interpreting
from pegboard.core.kernels.gemv import split_k_sum
from pegboard.core.kernels.pdl import launch_options
from pegboard.core.kernels.w4a16_kernels import _dot_kernel, _gemv_kernel

GEMV_MAX_ROWS = 4  # `BLOCK_M` up to which the CUDA-core kernel runs
TABLE = Path(__file__).with_name("w4a16_configs.json")
#: Programs a launch aims at: four per SM of an H100/H200 (132 SMs), so that enough weight
#: loads are in flight (a guess until the sweep has run).
TARGET_PROGRAMS = 528  # at most; a split also leaves every program two K steps at least
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
    fixup: bool = False  # split K summed by each tile's last program, not a second launch
    asm: bool = True  # the tensor-core kernel's and-or as one inline `lop3` (CUDA, compiled)

    @property
    def dot(self) -> bool:
        return self.block_m > GEMV_MAX_ROWS


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
    """A launch configuration from first principles, where the measured table has none: the
    tensor-core kernel, a K step inside one group (scales applied after the dot), and K split
    until about `TARGET_PROGRAMS` programs stream at once."""
    group = group or k
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 128, 128  # 16 x 128: 3.7 sm_90 instructions per weight (docs/kernels.md)
    while k % block_k or group % block_k:
        block_k //= 2
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while programs * split * 2 <= TARGET_PROGRAMS and k % (block_k * split * 4) == 0:
        split *= 2
    return W4A16Config(block_m, block_n, block_k, split, 4, 3)


@functools.cache
def _table() -> dict:
    try:
        return json.loads(Path(os.environ.get("PEGBOARD_W4A16_CONFIGS") or TABLE).read_text())
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


#: Split-K fix-up counters (int32, one per output tile, zero between launches), one buffer per
#: device: launches on one stream run one after another (a graph replay too), so they never
#: share a counter at the same time; pegboard runs a model's kernels on one stream.
FIXUP_TILES = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


def _fixup_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The counters for a launch of `tiles` output tiles, or None (use the second pass): too
    many tiles, or none allocated yet while a CUDA graph is being captured (they are allocated
    at the first launch outside a capture, e.g. the warm-up before it)."""
    if tiles > FIXUP_TILES:
        return None
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(FIXUP_TILES, dtype=torch.int32, device=device)
    return _counters[device]


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
    counters = _fixup_counters(x.device, grid[0] * grid[1]) if split > 1 and cfg.fixup else None
    extra = {}
    if cfg.dot:  # scale after the dot where a step lies in one group and x is 16-bit
        post = x.dtype in MAGIC_16BIT and group_size % cfg.block_k == 0
        magic, value = MAGIC_16BIT[x.dtype if post else torch.bfloat16]
        extra = {
            "POST_SCALE": post,
            "MAGIC16": magic,
            "MAGIC_VALUE": value,
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",  # fp32 x: exact
            "ASM": cfg.asm and x.device.type == "cuda" and not interpreting(),
        }
    kernel = _dot_kernel if cfg.dot else _gemv_kernel
    kernel[grid](
        x2,
        qweight,
        scales,
        offsets,
        bias if bias is not None else out,
        out,
        partial,
        counters if counters is not None else out,
        m,
        n,
        x2.stride(0),
        out.stride(0),
        K=k,
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        FIXUP=counters is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
        **extra,
    )
    if split > 1 and counters is None:
        split_k_sum(partial, bias, out, pdl)
    return out.view(*x.shape[:-1], n)
