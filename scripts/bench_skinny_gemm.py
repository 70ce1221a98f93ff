"""The skinny GEMM (`pegboard.core.kernels.skinny_gemm`) against cuBLAS (`F.linear`), bf16 on a
CUDA GPU, for the linear layers of Qwen3-0.6B and Llama-3.1-8B (fused qkv, o, fused gate/up,
down) at M = 16, 32, 64, 128, 256 rows of x (decode batches).

- `--sweep`: per shape and M, time cuBLAS and the candidate configurations of `candidates`
  (most plausible first, until the shape's share of `--budget-s`), check each against a
  float32 reference, and print the fastest; with `--write-table FILE` write the measured table
  `skinny_gemm.measured_config` reads: the fastest configuration where it beats cuBLAS by
  `--margin`, else null (cuBLAS). Entries of other devices already in FILE are kept. Point the
  engine at it with `PEGBOARD_SKINNY_GEMM_CONFIGS=FILE`, or copy it to
  `core/kernels/skinny_gemm_configs.json` to ship it.
- without it: time cuBLAS and the configuration the table holds (what the model runs).
- `--step`: all four linear layers of every layer of one decode step (distinct weights per
  layer, one CUDA graph) at each M, cuBLAS alone vs `dense.linear` with the table (the one
  just written, after `--sweep --write-table`).

Times are medians over replays of one CUDA graph of many calls cycling through weight copies
that exceed the L2 cache (`bench_gemv.Bench`), so every call streams its weight from memory as
a decode step does; x stays in L2, as the previous kernel's output does. Run on the lent
machine through `bash scripts/device-run.sh gemm-sweep` (or after `... setup`):

    python3 scripts/bench_skinny_gemm.py [--sweep [--write-table FILE]] [--step]
        [--configs qwen3-0.6b,llama-3.1-8b] [--rows 16,32,64,128,256] [--budget-s S] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from bench_gemv import Bench, Shape, environment, graph_us, relative_error, shapes  # same folder
from pegboard.core.bench.models import config_model_dir
from pegboard.core.kernels import dense, skinny_gemm
from pegboard.core.kernels.skinny_gemm import SkinnyConfig
from pegboard.core.models.config import ModelConfig
from torch.nn import functional as F

CONFIGS = ("qwen3-0.6b", "llama-3.1-8b")
ROWS = (16, 32, 64, 128, 256)
DTYPE, DEVICE = torch.bfloat16, torch.device("cuda")
SMEM_BYTES = 227 * 1024  # shared memory per program at most on an H100/H200
# Triton 3.9 for sm_90 allocates `num_stages + 1` operand buffers for this kernel (the first
# step's tiles are loaded before the loop): `(stages + 1) * (BLOCK_M + BLOCK_N) * BLOCK_K * 2`.


@dataclass
class Case:
    shape: Shape
    rows: int
    cublas_us: float
    best_us: float | None = None  # the fastest candidate (sweep) or the table's configuration
    best: dict | None = None
    error: float | None = None
    chosen: dict | None = None  # what the table gets: `best` where it beat cuBLAS, else None
    candidates: list[dict] = field(default_factory=list)


def fill_split(tiles: int, k: int, block_k: int, sms: int) -> int:
    """The power-of-two K split that brings `tiles` programs closest to one per SM from below
    (at least one), leaving every program two K steps or more of whole `block_k` steps."""
    split = 1
    while (
        tiles * split * 2 <= sms
        and k % (block_k * split * 2) == 0
        and k // (split * 2) >= 2 * block_k
    ):
        split *= 2
    return split


def candidates(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """Launch configurations to try for `m` rows (a bucket's top) and a `[N, K]` weight, most
    plausible first: the weight rows as the MMA's long side (`swap`, x's rows padded to 16-64)
    up to 64 rows, ordinary GEMM tiles of 64-128 rows from 64 rows; each with K split to fill
    the SMs once in K steps of 128, 4 warps, 3 stages; then twice and half that split, K steps
    of 64 with 4 stages, unsplit, 8 warps. Tiles whose operands would not fit in shared memory
    are left out."""
    rows = max(16, triton.next_power_of_2(m))
    tiles: list[tuple[int, int, bool]] = []
    if rows <= 64:
        tiles += [(rows, 64, True), (rows, 128, True)]
    if rows >= 64:
        tiles += [(64, 64, False), (64, 32, False), (128, 64, False), (64, 128, False)]
    if rows >= 128:
        tiles += [(128, 128, False), (128, 32, False)]
    out: list[SkinnyConfig] = []

    def tier(bk: int, split_of, warps: int, stages: int) -> None:
        for bm, bn, swap in tiles:
            if k % bk or (stages + 1) * (bm + bn) * bk * 2 > SMEM_BYTES:
                continue
            programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            split = max(1, split_of(fill_split(programs, k, bk, sms)))
            if k % (bk * split):
                continue
            cfg = SkinnyConfig(bm, bn, bk, split, swap, warps, stages)
            if cfg not in out:
                out.append(cfg)

    tier(128, lambda s: s, 4, 3)
    tier(128, lambda s: s * 2, 4, 3)
    tier(128, lambda s: s // 2, 4, 3)
    tier(64, lambda s: s, 4, 4)
    tier(128, lambda s: 1, 4, 4)
    tier(128, lambda s: s, 8, 3)
    tier(64, lambda s: s * 2, 4, 4)
    return out


def check(bench: Bench, x: torch.Tensor, config: SkinnyConfig, reference: torch.Tensor) -> float:
    """The relative error of `config` on the first weight copy, into a NaN-poisoned output."""
    torch.full((x.shape[0], bench.shape.n), float("nan"), dtype=DTYPE, device=DEVICE)
    out = skinny_gemm.skinny_gemm(x, bench.weights[0], None, config)  # lands in the freed NaN
    return relative_error(out, reference)


def sweep_case(bench: Bench, m: int, deadline: float, args: argparse.Namespace, sms: int) -> Case:
    """cuBLAS and up to `--max-candidates` candidates (until `deadline`) at `m` rows."""
    s = bench.shape
    x = torch.randn(m, s.k, device=DEVICE, dtype=DTYPE)
    case = Case(s, m, bench.time(x, F.linear))
    reference = F.linear(x.float(), bench.weights[0].float())
    for config in candidates(m, s.n, s.k, sms)[: args.max_candidates]:
        if time.monotonic() > deadline and case.candidates:
            break
        try:
            error = check(bench, x, config, reference)
            us = bench.time(x, lambda x, w, c=config: skinny_gemm.skinny_gemm(x, w, None, c))
        except Exception as e:  # a configuration that fails to compile or launch is skipped
            print(f"  skip {s.layer} {m} {config}: {type(e).__name__}: {str(e)[:120]}")
            continue
        case.candidates.append({"us": us, "error": error, **asdict(config)})
        if error < 1e-2 and (case.best_us is None or us < case.best_us):
            case.best_us, case.best, case.error = us, asdict(config), error
    # cuBLAS again, now that the GPU has run a while: its best, so clocks favour it, not us
    case.cublas_us = min(case.cublas_us, bench.time(x, F.linear))
    if case.best_us is not None and case.best_us < case.cublas_us * (1 - args.margin):
        case.chosen = case.best
    return case


def table_case(bench: Bench, m: int) -> Case:
    """cuBLAS and the table's configuration (if any) at `m` rows."""
    s = bench.shape
    x = torch.randn(m, s.k, device=DEVICE, dtype=DTYPE)
    case = Case(s, m, bench.time(x, F.linear))
    config = skinny_gemm.measured_config(m, bench.weights[0])
    if config is not None:
        reference = F.linear(x.float(), bench.weights[0].float())
        case.error = check(bench, x, config, reference)
        case.best_us = bench.time(x, lambda x, w: skinny_gemm.skinny_gemm(x, w, None, config))
        case.best = case.chosen = asdict(config)
    return case


def write_table(path: Path, cases: list[Case]) -> int:
    """Merge the sweep's choices for this device into the table at `path` (or the shipped
    one's entries, if `path` does not exist yet); the number of kernel entries for it."""
    table: dict = {}
    for source in (skinny_gemm.TABLE, path):
        if source.exists():
            table.update(json.loads(source.read_text()))
    device = table.setdefault(torch.cuda.get_device_name(), {}).setdefault(
        str(DTYPE).removeprefix("torch."), {}
    )
    for c in cases:
        by_bucket = device.setdefault(skinny_gemm.table_key(c.shape.n, c.shape.k), {})
        by_bucket[str(skinny_gemm.rows_bucket(c.rows))] = c.chosen
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return sum(v is not None for by in device.values() for v in by.values())


def decode_steps(config: str, rows: list[int]) -> dict[str, dict[str, float]]:
    """GPU ms of the four linear layers of every layer of one decode step (distinct weights per
    layer, one graph) at each of `rows`: cuBLAS alone, and `dense.linear` (the skinny GEMM
    where the table has it; at these row counts the GEMV never runs)."""
    cfg = ModelConfig.from_dir(config_model_dir(config))
    layer_shapes = shapes(config)[:4]
    weights = [
        torch.empty(s.n, s.k, device=DEVICE, dtype=DTYPE).normal_()
        for s in layer_shapes * cfg.num_layers
    ]
    steps = {}
    for m in rows:
        inputs = {s.k: torch.randn(m, s.k, device=DEVICE, dtype=DTYPE) for s in layer_shapes}
        step = {}
        for name, op in (("cublas", F.linear), ("table", dense.linear)):
            calls = [lambda w=w, op=op, x=inputs[w.shape[1]]: op(x, w) for w in weights]
            step[f"{name}_ms"] = graph_us(calls, replays=10) * len(weights) / 1e3
        step["kernel_layers"] = sum(
            skinny_gemm.measured_config(m, w) is not None for w in weights[: len(layer_shapes)]
        )
        steps[f"{config} M {m}"] = step
    del weights
    torch.cuda.empty_cache()
    return steps


def print_cases(cases: list[Case]) -> None:
    print(f"\n{torch.cuda.get_device_name()}, bf16, µs per call (graph replays, weights cold)")
    print(
        f"{'shape':<26}{'M':>4} {'cuBLAS':>8} {'TB/s':>5} {'kernel':>8} {'TB/s':>5} {'x':>5}  config"
    )
    for c in cases:
        s = c.shape
        weight = s.weight_bytes
        name = f"{s.config[:5]} {s.layer} {s.n}x{s.k}"
        line = f"{name:<26}{c.rows:>4} {c.cublas_us:>8.1f} {weight / c.cublas_us / 1e6:>5.2f}"
        if c.best_us is not None:
            line += f" {c.best_us:>8.1f} {weight / c.best_us / 1e6:>5.2f} {c.cublas_us / c.best_us:>5.2f}"
            b = SkinnyConfig(**c.best)
            line += (
                f"  {'used' if c.chosen else 'cuBLAS kept'}: {b.block_m}x{b.block_n}x{b.block_k}"
            )
            line += f" split {b.split_k}{' swap' if b.swap else ''} w{b.num_warps} s{b.num_stages}"
            line += f" (err {c.error:.1e}, {len(c.candidates)} tried)" if c.candidates else ""
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="try the candidate configurations")
    p.add_argument("--write-table", type=Path, help="with --sweep: the measured table to write")
    p.add_argument("--step", action="store_true", help="also time whole decode steps' linears")
    p.add_argument("--configs", default=",".join(CONFIGS), help="model configs (comma-separated)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x (M) to time")
    p.add_argument("--layers", default="qkv,o,gate_up,down", help="layers to time")
    p.add_argument("--budget-s", type=float, default=200, help="stop sweeping after this")
    p.add_argument("--margin", type=float, default=0.03, help="win over cuBLAS a choice needs")
    p.add_argument("--max-candidates", type=int, default=16, help="per shape and M, at most")
    p.add_argument("--json", type=Path, help="write every result here")
    args = p.parse_args()
    deadline = time.monotonic() + args.budget_s
    rows = [int(r) for r in args.rows.split(",")]
    layers = args.layers.split(",")
    todo: list[Shape] = [
        s for config in args.configs.split(",") for s in shapes(config) if s.layer in layers
    ]
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: {sms} SMs; {len(todo)} shapes x M {rows}", flush=True)
    torch.manual_seed(0)
    cases: list[Case] = []
    left, entries = len(todo) * len(rows), 0
    with torch.inference_mode():
        for shape in todo:
            bench = Bench(shape)
            for m in rows:
                if args.sweep:  # the time left is shared evenly among the cases left
                    case_deadline = time.monotonic() + (deadline - time.monotonic()) / left
                    case = sweep_case(bench, m, case_deadline, args, sms)
                else:
                    case = table_case(bench, m)
                left -= 1
                cases.append(case)
                print(
                    f"{shape.config} {shape.layer} {shape.n}x{shape.k} M {m}: cuBLAS "
                    f"{case.cublas_us:.1f} us, kernel {case.best_us} us {case.best} "
                    f"{'used' if case.chosen else 'cuBLAS kept'}",
                    flush=True,
                )
            del bench
            torch.cuda.empty_cache()
            if args.sweep and args.write_table:  # after every shape: a timeout loses little
                entries = write_table(args.write_table, cases)
        if args.sweep and args.write_table:
            print(f"wrote {args.write_table}: {entries} skinny GEMM entries for this device")
            os.environ[skinny_gemm.TABLE_ENV] = str(args.write_table)
            skinny_gemm.reload_table()
        steps = {}
        if args.step:
            for config in args.configs.split(","):
                steps |= decode_steps(config, rows)
    print_cases(cases)
    for name, s in steps.items():
        print(
            f"step {name}: linears cuBLAS {s['cublas_ms']:.3f} ms, with the table "
            f"{s['table_ms']:.3f} ms ({s['cublas_ms'] / s['table_ms']:.2f}x; "
            f"{s['kernel_layers']} of 4 shapes on the skinny GEMM)"
        )
    if args.json:
        payload = {
            **environment(),
            "sweep": args.sweep,
            "margin": args.margin,
            "cases": [asdict(c) for c in cases],
            "decode_step": steps,
        }
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
