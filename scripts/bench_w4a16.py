"""W4A16 kernels (`pegboard.core.kernels.w4a16`) against bf16 (cuBLAS and pegboard's GEMV path),
on a CUDA GPU, for the linear layers of Llama-3.1-8B (fused qkv, o, fused gate/up, down) with
random weights quantized to 4 bits, group 128 (`--group`), at M = 1, 4, 16, 32, 64 rows.

Per shape and M: the median µs per call over replays of one CUDA graph cycling through weight
copies that exceed the L2 cache (every call streams its weight from memory, as a decode step
does), the effective TB/s of the 4-bit bytes, the speedup over cuBLAS bf16, and the relative
error against `x @ dequantize(W).T` in float32.

- `--sweep`: also try a grid of launch configurations per shape and M (both kernels where
  they apply), print the fastest, and with `--write-table FILE` write them as the measured
  table `w4a16.pick_config` reads (copy it to `core/kernels/w4a16_configs.json`; entries of
  other devices already in FILE or in that file are kept).
- `--gemlite`: also time gemlite's A16W4 kernels (the library the issue names as the
  alternative; `--w4a16-kernel gemlite`) on the same weights converted as the plugin converts
  them (`gemlite_layout.to_gemlite`, launch configurations as `w4a16_gemlite.prepare` fills
  them), with their error; and again with gemlite's default bf16 atomics (faster by a
  conversion kernel, less exact: `PEGBOARD_GEMLITE_NATIVE_ATOMICS`); said and skipped where
  gemlite does not import.
- `--tinygemm`: also time PyTorch's int4 kernel (`torch._weight_int4pack_mm`; `--w4a16-kernel
  tinygemm`, which the plugin runs up to `w4a16_tinygemm.MAX_ROWS` rows) on the same weights
  converted as the plugin converts them (`tinygemm_layout.to_tinygemm`), with its error; said
  and skipped where it cannot run.
- `--dequant`: also time the many-rows path (`w4a16_dequant.dequant_linear`: the layer
  de-quantized into one shared bf16 buffer, then cuBLAS; `--w4a16-dequant-min-rows`), with its
  error; `--model qwen3-0.6b` times that model's layers instead of Llama-3.1-8B's.
- `--step`: all linear layers of one Llama-3.1-8B decode step (32 layers, distinct weights) in
  one graph, bf16 vs W4A16 (and gemlite, tinygemm with `--gemlite`, `--tinygemm`), at each M.

    python3 scripts/bench_w4a16.py [--sweep [--write-table FILE]] [--gemlite] [--tinygemm]
        [--step] [--dequant] [--model llama-3.1-8b|qwen3-0.6b]
        [--group 128] [--rows 1,4,16,32,64] [--layers qkv,o,gate_up,down] [--json FILE]

The sweep's grid: `candidates`. Random weights are GPTQ-symmetric-like (float16 scales, offset -8 x scale: 2 + 2 bytes per
group, what a float16-scaled checkpoint gives; asymmetric GPTQ keeps float32 offsets).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton
from bench_gemv import graph_us, relative_error  # scripts/bench_gemv.py (same folder)
from pegboard.core.kernels import w4a16
from pegboard.core.kernels.gemv import linear as gemv_linear
from pegboard.core.kernels.w4a16 import W4A16Config, pick_config, w4a16_linear
from pegboard.core.kernels.w4a16_dequant import dequant_linear
from pegboard.plugins.linear.gemlite_layout import to_gemlite
from pegboard.plugins.linear.int4 import Int4Weights, dequantize_packed, pack
from pegboard.plugins.linear.tinygemm_layout import to_tinygemm
from torch.nn import functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
#: `--model`: the layers (N x K) of each model's decoder layer.
MODEL_SHAPES = {
    "llama-3.1-8b": SHAPES,
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
}  # fmt: skip
ROWS = (1, 4, 16, 32, 64)
DTYPE, DEVICE = torch.bfloat16, torch.device("cuda")
ROTATE_BYTES = 2 * 60 * 2**20 * 2  # twice an H200's 60 MiB L2, and some


def quantized(n: int, k: int, group: int, seed: int, asym: bool = False):
    """A packed layer: codes 0..15, float16 scales, zero point 8 (GPTQ sym) or, with `asym`,
    random integer zero points."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, device=DEVICE, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen, device=DEVICE) * 0.004 + 0.001).half()
    zeros = torch.full((n, k // group), 8.0, device=DEVICE)
    if asym:
        zeros = torch.randint(0, 16, (n, k // group), generator=gen, device=DEVICE).float()
    return pack(Int4Weights(q, scales.float(), -zeros * scales.float(), group), DTYPE)


def packed_bytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in (p.qweight, p.scales, p.offsets))


def copies_for(bytes_each: int) -> tuple[int, int]:
    copies = min(64, max(2, math.ceil(ROTATE_BYTES / bytes_each)))
    return copies, max(1, math.ceil(2 * ROTATE_BYTES / (copies * bytes_each)))


def time_dense(n: int, k: int, x: torch.Tensor, op) -> float:
    copies, reps = copies_for(n * k * 2)
    weights = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) for _ in range(copies)]
    return graph_us([lambda w=w: op(x, w) for w in weights] * reps)


def time_w4(layers, x: torch.Tensor, group: int, config: W4A16Config | None, reps: int) -> float:
    calls = [
        lambda p=p: w4a16_linear(x, p.qweight, p.scales, p.offsets, group, None, config)
        for p in layers
    ]
    return graph_us(calls * reps)


def candidates(m: int, n: int, k: int, group: int) -> list[W4A16Config]:
    """The sweep's grid, most plausible first (the sweep stops at its time budget): the
    tensor-core kernel (x padded to 16+ rows) with output blocks of 64/128/256 columns and K
    steps inside one group (scales after the dot), K split for ~4 programs per SM, then twice
    and half that, then 8 warps and other pipelining depths; the CUDA-core kernel (up to 4
    rows) interleaved after the first tensor-core candidates; the first split-K ones also with
    the in-kernel fix-up; the first one also without inline assembly."""
    bm = max(16, min(64, triton.next_power_of_2(m)))
    steps = [bk for bk in (128, 64, 32) if group % bk == 0][:2]  # inside one group
    dot = [(bm, bn, bk) for bk in steps for bn in (128, 64, 256)]
    gemv = [(triton.next_power_of_2(m), bn, bk) for bn in (128, 256) for bk in (128, 256)]
    shapes = dot[:2] + (gemv[:1] if m <= w4a16.GEMV_MAX_ROWS else []) + dot[2:]
    shapes += gemv[1:] if m <= w4a16.GEMV_MAX_ROWS else []
    launch = [(4, 3), (8, 3), (4, 4), (4, 2), (8, 4)]  # (warps, stages)
    out = []
    for variant in range(3 * len(launch)):  # split x1, x2, x1/2 per launch setting
        for bm_, bn, bk in shapes:
            if k % bk:
                continue
            programs = triton.cdiv(n, bn) * triton.cdiv(m, bm_)
            split = 1
            while programs * split * 2 <= w4a16.TARGET_PROGRAMS and k % (bk * split * 4) == 0:
                split *= 2
            split = {0: split, 1: split * 2, 2: max(1, split // 2)}[variant % 3]
            warps, stages = launch[variant // 3]
            if bm_ <= w4a16.GEMV_MAX_ROWS:
                stages = min(stages, 2)
            cfg = W4A16Config(bm_, bn, bk, min(split, 32), warps, stages)
            if cfg not in out and k % (bk * cfg.split_k) == 0:
                out.append(cfg)
    # the first few split-K candidates also with the in-kernel fix-up (no second launch)
    twins = [c for c in out[:8] if c.split_k > 1]
    out = [t for c in out for t in ([c, replace(c, fixup=True)] if c in twins else [c])]
    # and the first one without the inline-asm unpacking (its plain Triton spelling)
    return out[:2] + [replace(out[0], asm=False)] + out[2:]


def bench_shape(name: str, n: int, k: int, group: int, args) -> list[dict]:
    layers = [quantized(n, k, group, 0)]
    bytes_w4 = packed_bytes(layers[0])
    copies, reps = copies_for(bytes_w4)
    layers += [quantized(n, k, group, seed) for seed in range(1, copies)]
    ref_w = dequantize_packed(layers[0], torch.float32)
    converted = gemlite_layers(layers, n, k, group) if args.gemlite else None
    tiny = tinygemm_layers(layers, n, k, group) if args.tinygemm else None
    rows = []
    for m in args.rows:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        cublas = time_dense(n, k, x, F.linear)
        gemv = time_dense(n, k, x, gemv_linear)
        w4 = time_w4(layers, x, group, None, reps)
        p = layers[0]
        out = w4a16_linear(x, p.qweight, p.scales, p.offsets, group)
        err = relative_error(out, x.float() @ ref_w.to(DTYPE).float().T)  # ref_w is [n, k]
        row = {
            "layer": name, "n": n, "k": k, "m": m, "cublas_us": cublas, "bf16_gemv_us": gemv,
            "w4a16_us": w4, "speedup_vs_cublas": cublas / w4, "w4a16_tb_s": bytes_w4 / w4 / 1e6,
            "rel_error": err, "config": str(pick_config(m, n, k, group, DEVICE)),
        }  # fmt: skip
        if args.sweep:
            best = (float("inf"), None)
            cases_left = max(1, args.cases_left)
            deadline = time.monotonic() + (args.deadline - time.monotonic()) / cases_left
            args.cases_left -= 1
            for cfg in candidates(m, n, k, group):
                if time.monotonic() > deadline:
                    break
                try:
                    t = time_w4(layers, x, group, cfg, reps)
                    o = w4a16_linear(x, p.qweight, p.scales, p.offsets, group, None, cfg)
                    if relative_error(o, x.float() @ ref_w.to(DTYPE).float().T) > 2e-2:
                        continue
                except Exception as e:  # a configuration Triton cannot compile here
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                best = min(best, (t, cfg), key=lambda b: b[0])
            row["best_us"], row["best_config"] = best[0], str(best[1])
            if best[1] is not None:
                row["best"] = w4a16.config_dict(best[1])
        if args.gemlite:
            row.update(time_gemlite(converted, x, reps, x.float() @ ref_w.to(DTYPE).float().T))
        if args.tinygemm:
            row.update(time_tinygemm(tiny, x, reps, x.float() @ ref_w.to(DTYPE).float().T))
        if args.dequant:
            row.update(time_dequant(layers, x, group, reps, x.float() @ ref_w.to(DTYPE).float().T))
        rows.append(row)
        print(
            f"{name:8s} M={m:3d}  cuBLAS {cublas:8.1f} µs  GEMV {gemv:8.1f}  W4A16 {w4:8.1f} "
            f"({min(cublas, gemv) / w4:4.2f}x bf16, {row['w4a16_tb_s']:.2f} TB/s, err {err:.1e})"
            + (
                f"  best {row['best_us']:.1f} ({min(cublas, gemv) / row['best_us']:.2f}x) "
                f"{row['best_config']}"
                if args.sweep
                else ""
            )
            + (
                f"  gemlite {row['gemlite_us']:8.1f} ({min(cublas, gemv) / row['gemlite_us']:4.2f}x "
                f"bf16, err {row['gemlite_rel_error']:.1e}, {row['gemlite_kernel']}; bf16 "
                f"atomics {row['gemlite_native_us']:.1f}, err {row['gemlite_native_rel_error']:.1e})"
                if "gemlite_us" in row
                else (f"  gemlite: {row['gemlite']}" if args.gemlite else "")
            )
            + (
                f"  tinygemm {row['tinygemm_us']:8.1f} ({min(cublas, gemv) / row['tinygemm_us']:4.2f}x"
                f" bf16, err {row['tinygemm_rel_error']:.1e})"
                if "tinygemm_us" in row
                else (f"  tinygemm: {row['tinygemm']}" if args.tinygemm else "")
            )
            + (
                f"  dequant+cuBLAS {row['dequant_us']:8.1f} ({min(cublas, gemv) / row['dequant_us']:4.2f}x"
                f" bf16, err {row['dequant_rel_error']:.1e})"
                if args.dequant
                else ""
            ),
            flush=True,
        )
    return rows


def time_dequant(layers, x: torch.Tensor, group: int, reps: int, reference) -> dict:
    """The many-rows path over the same weights: one shared buffer, as the plugin has."""
    n = layers[0].scales.shape[1]
    buffer = torch.empty(x.shape[1] * n, device=DEVICE, dtype=DTYPE)
    calls = [
        lambda p=p: dequant_linear(x, p.qweight, p.scales, p.offsets, group, buffer) for p in layers
    ]
    p = layers[0]
    out = dequant_linear(x, p.qweight, p.scales, p.offsets, group, buffer)
    return {
        "dequant_us": graph_us(calls * reps),
        "dequant_rel_error": relative_error(out, reference),
    }


def gemlite_layers(layers, n: int, k: int, group: int):
    """The layers in gemlite's layout, or why gemlite cannot run here (a string)."""
    from pegboard.core.kernels import w4a16_gemlite

    reason = w4a16_gemlite.unavailable_reason(DEVICE, DTYPE)
    if reason is not None:
        return reason
    w4a16_gemlite.prepare(n, k, group, DTYPE)
    return [to_gemlite(p, DTYPE) for p in layers]


def tinygemm_layers(layers, n: int, k: int, group: int):
    """The layers in tinygemm's layout, or why tinygemm cannot run here (a string)."""
    from pegboard.core.kernels import w4a16_tinygemm

    reason = w4a16_tinygemm.unavailable_reason(DEVICE, DTYPE)
    reason = reason or w4a16_tinygemm.shape_unsupported_reason(n, k, group)
    return reason if reason is not None else [to_tinygemm(p) for p in layers]


def tinygemm_call(x: torch.Tensor, t):
    from pegboard.core.kernels.w4a16_tinygemm import tinygemm_linear

    return lambda: tinygemm_linear(x, t.qweight, t.scales_and_zeros, t.group_size)


def time_tinygemm(converted, x: torch.Tensor, reps: int, reference) -> dict:
    """tinygemm on the converted layers (`tinygemm_layers`; the first is checked against
    `reference`): µs per call and error; or `{"tinygemm": reason}`."""
    if isinstance(converted, str):
        return {"tinygemm": converted}
    err = relative_error(tinygemm_call(x, converted[0])(), reference)
    us = graph_us([tinygemm_call(x, t) for t in converted] * reps)
    return {"tinygemm_us": us, "tinygemm_rel_error": err}


def gemlite_call(x: torch.Tensor, g):
    from pegboard.core.kernels.w4a16_gemlite import gemlite_linear

    return lambda: gemlite_linear(x, g.qweight, g.scales, g.zeros, g.group_size, g.fma)


def time_gemlite(converted, x: torch.Tensor, reps: int, reference) -> dict:
    """gemlite on the converted layers (`gemlite_layers`; the first is checked against
    `reference`): µs per call, error, the kernel it ran; or `{"gemlite": reason}`."""
    from pegboard.core.kernels.w4a16_gemlite import matmul_type

    if isinstance(converted, str):
        return {"gemlite": converted}
    err = relative_error(gemlite_call(x, converted[0])(), reference)
    us = graph_us([gemlite_call(x, g) for g in converted] * reps)
    out = {"gemlite_us": us, "gemlite_rel_error": err, "gemlite_kernel": matmul_type(x.shape[0])}
    with native_atomics():  # gemlite's default: partial sums added in bf16, no conversion
        out["gemlite_native_rel_error"] = relative_error(gemlite_call(x, converted[0])(), reference)
        out["gemlite_native_us"] = graph_us([gemlite_call(x, g) for g in converted] * reps)
    return out


@contextlib.contextmanager
def native_atomics():
    from pegboard.core.kernels import w4a16_gemlite

    kinds, w4a16_gemlite.ATOMIC_KINDS = w4a16_gemlite.ATOMIC_KINDS, ()
    try:
        yield
    finally:
        w4a16_gemlite.ATOMIC_KINDS = kinds


def write_table(path: Path, rows: list[dict], group: int) -> None:
    """Merge the sweep's fastest configurations into the table `w4a16.pick_config` reads."""
    table = {}
    for source in (w4a16.TABLE, path):
        if source.exists():
            table.update(json.loads(source.read_text()))
    device = table.setdefault(torch.cuda.get_device_name(), {})
    for r in rows:
        if "best" in r:
            key = w4a16.table_key(r["n"], r["k"], group)
            device.setdefault(key, {})[str(w4a16.rows_bucket(r["m"]))] = r["best"]
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({sum(len(v) for v in device.values())} entries for this device)")


def bench_step(
    group: int, rows: tuple[int, ...], with_gemlite: bool, with_tinygemm: bool
) -> list[dict]:
    """All linears of a Llama-3.1-8B decode step (32 layers), bf16 vs W4A16 (and gemlite,
    tinygemm), per M."""
    results = []
    dense = {
        name: [torch.randn(n, k, device=DEVICE, dtype=DTYPE) for _ in range(32)]
        for name, (n, k) in SHAPES.items()
    }
    w4 = {name: [quantized(n, k, group, i) for i in range(32)] for name, (n, k) in SHAPES.items()}
    gl = {name: gemlite_layers(w4[name], n, k, group) for name, (n, k) in SHAPES.items()
          if with_gemlite}  # fmt: skip
    if with_gemlite and any(isinstance(v, str) for v in gl.values()):
        print(f"step: gemlite skipped: {next(v for v in gl.values() if isinstance(v, str))}")
        with_gemlite = False
    tg = {name: tinygemm_layers(w4[name], n, k, group) for name, (n, k) in SHAPES.items()
          if with_tinygemm}  # fmt: skip
    if with_tinygemm and any(isinstance(v, str) for v in tg.values()):
        print(f"step: tinygemm skipped: {next(v for v in tg.values() if isinstance(v, str))}")
        with_tinygemm = False
    for m in rows:
        xs = {
            name: torch.randn(m, k, device=DEVICE, dtype=DTYPE) for name, (_, k) in SHAPES.items()
        }
        bf16 = graph_us(
            [lambda w=w, x=xs[name]: gemv_linear(x, w) for name in SHAPES for w in dense[name]]
        )
        q4 = graph_us([
            lambda p=p, x=xs[name]: w4a16_linear(x, p.qweight, p.scales, p.offsets, group)
            for name in SHAPES for p in w4[name]
        ])  # fmt: skip
        n_calls = 4 * 32
        result = {"m": m, "bf16_step_ms": bf16 * n_calls / 1e3, "w4a16_step_ms": q4 * n_calls / 1e3}
        line = (f"step M={m:3d}: bf16 {bf16 * n_calls / 1e3:.2f} ms, W4A16 {q4 * n_calls / 1e3:.2f}"
                f" ms ({bf16 / q4:.2f}x)")  # fmt: skip
        if with_gemlite:
            calls = [gemlite_call(xs[name], g) for name in SHAPES for g in gl[name]]
            g4 = graph_us(calls)
            with native_atomics():
                native = graph_us(calls)
            result["gemlite_step_ms"] = g4 * n_calls / 1e3
            result["gemlite_native_step_ms"] = native * n_calls / 1e3
            line += (f", gemlite {g4 * n_calls / 1e3:.2f} ms ({bf16 / g4:.2f}x; with bf16 "
                     f"atomics {native * n_calls / 1e3:.2f} ms, {bf16 / native:.2f}x)")  # fmt: skip
        if with_tinygemm:
            t4 = graph_us([tinygemm_call(xs[name], t) for name in SHAPES for t in tg[name]])
            result["tinygemm_step_ms"] = t4 * n_calls / 1e3
            line += f", tinygemm {t4 * n_calls / 1e3:.2f} ms ({bf16 / t4:.2f}x)"
        results.append(result)
        print(line, flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--gemlite", action="store_true")
    p.add_argument("--tinygemm", action="store_true")
    p.add_argument("--step", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--write-table", type=Path, help="with --sweep: the measured table to write")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x (M) to time")
    p.add_argument("--layers", default=",".join(SHAPES), help="layers to time")
    p.add_argument("--dequant", action="store_true")
    p.add_argument("--model", choices=list(MODEL_SHAPES), default="llama-3.1-8b")
    p.add_argument("--budget-s", type=float, default=400, help="stop sweeping after this")
    args = p.parse_args()
    args.deadline = time.monotonic() + args.budget_s
    args.rows = tuple(int(r) for r in args.rows.split(","))
    print(torch.cuda.get_device_name(), flush=True)
    shapes = {name: MODEL_SHAPES[args.model][name] for name in args.layers.split(",")}
    args.cases_left = len(shapes) * len(args.rows)  # the sweep's budget is shared evenly
    rows = [r for name, (n, k) in shapes.items() for r in bench_shape(name, n, k, args.group, args)]
    if args.sweep and args.write_table:
        write_table(args.write_table, rows, args.group)
    step = bench_step(args.group, args.rows, args.gemlite, args.tinygemm) if args.step else []
    if args.json:
        args.json.write_text(json.dumps({"layers": rows, "step": step}, indent=2))


if __name__ == "__main__":
    main()
