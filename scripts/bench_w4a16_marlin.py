"""The Marlin-style W4A16 CUDA kernel (`pegboard.core.kernels.w4a16_marlin`, NVRTC) on
Llama-3.1-8B's linear shapes (fused qkv, o, fused gate/up, down), group 128, on a CUDA GPU.

1. Compiles every candidate configuration (`w4a16_marlin.CANDIDATES`) for the M asked; a
   configuration NVRTC rejects is printed with the compiler's log and left out (the script
   goes on with the others).
2. Correctness per shape and M: random asymmetric weights (float16 scales, integer zero
   points), every candidate against `x.float() @ W_deq.T` (W_deq the exact float32 weights):
   norm-relative and max relative error (max |y - ref| / max |ref|); the same for the bf16
   de-quantized weights through cuBLAS, the rounding the kernel is compared with.
3. µs per call, the median over replays of one CUDA graph cycling through weight copies
   that exceed the L2 cache twice (`bench_gemv.graph_us`): cuBLAS bf16 (`x @ W.T`),
   pegboard's bf16 path (`gemv.linear`: its GEMV where `DECODE_CONFIGS` has one, M <= 8),
   tinygemm (`torch._weight_int4pack_mm`) and each Marlin candidate (and the first with K
   split across two blocks, `-s2`); then the four layers summed x 32 layers per M.
4. Chained per M (where all four layers ran): the four layers x 32 in sequence as ONE CUDA
   graph (two weight copies per layer, alternating: a decoder layer's weights exceed the L2),
   timed as a whole, with the plugin's configurations now (`layer_config`), each layer's best
   here, and that best with programmatic dependent launch (`pdl`) on and off in every layer:
   PDL's gain shows only between consecutive kernels. A table last; JSON with `--json`.

    python3 scripts/bench_w4a16_marlin.py [--rows 1,4,16,32,64] [--group 128] [--json FILE]
        [--layers qkv,o,gate_up,down] [--default-only] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import replace

import torch
from bench_gemv import graph_us  # scripts/bench_gemv.py (same folder)
from bench_w4a16 import DEVICE, DTYPE, ROTATE_BYTES, SHAPES, quantized
from pegboard.core.kernels import w4a16_marlin
from pegboard.core.kernels.gemv import linear as gemv_linear
from pegboard.core.kernels.w4a16_marlin import PARAM_DTYPES, CompileError, marlin_linear
from pegboard.plugins.linear.int4 import dequantize_packed
from pegboard.plugins.linear.marlin_layout import to_marlin
from pegboard.plugins.linear.tinygemm_layout import to_tinygemm
from torch.nn import functional as F


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = out.float() - ref
    return {
        "rel_error": (diff.norm() / ref.norm()).item(),
        "max_rel_error": (diff.abs().max() / ref.abs().max()).item(),
    }


def tinygemm(x: torch.Tensor, t) -> torch.Tensor:
    return torch._weight_int4pack_mm(x, t.qweight, t.group_size, t.scales_and_zeros)


def copies_for(bytes_each: int) -> tuple[int, int]:
    copies = min(16, max(2, math.ceil(ROTATE_BYTES / bytes_each)))
    return copies, max(1, math.ceil(2 * ROTATE_BYTES / (copies * bytes_each)))


def compile_all(rows: list[int], group: int) -> dict:
    """The candidates per n8-tile count that NVRTC compiled; prints the log of any that failed."""
    ok = {}
    for mt in sorted({w4a16_marlin.token_tiles(m) for m in rows}):
        ok[mt] = []
        for config in w4a16_marlin.CANDIDATES[mt]:
            start = time.perf_counter()
            try:
                w4a16_marlin.compiled(config, mt, group)
            except CompileError as e:
                print(f"COMPILE FAILED m{mt} {config.name}:\n{e}", flush=True)
                continue
            print(
                f"compiled m{mt} {config.name} in {time.perf_counter() - start:.1f} s", flush=True
            )
            ok[mt].append(config)
    return ok


def bench_shape(name: str, n: int, k: int, group: int, rows: list[int], configs: dict) -> list:
    layers = [quantized(n, k, group, seed, asym=True) for seed in range(1)]
    packed_bytes = n * k // 2 + layers[0].scales.numel() * 8
    copies, reps = copies_for(packed_bytes)
    layers += [quantized(n, k, group, seed, asym=True) for seed in range(1, copies)]
    marlin = {kind: [to_marlin(p, dtype) for p in layers] for kind, dtype in PARAM_DTYPES.items()}
    tiny = [to_tinygemm(p) for p in layers]
    w_deq = dequantize_packed(layers[0], torch.float32).contiguous()  # [N, K] float32
    w_bf16 = w_deq.to(DTYPE)
    dense_copies, dense_reps = copies_for(n * k * 2)
    dense = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) for _ in range(dense_copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        ref = x.float() @ w_deq.t()
        row = {"layer": name, "n": n, "k": k, "m": m, "group": group}
        row["bf16_deq"] = errors(x @ w_bf16.t(), ref)
        row["cublas_us"] = graph_us([lambda w=w, x=x: F.linear(x, w) for w in dense] * dense_reps)
        row["pegboard_bf16_us"] = graph_us(
            [lambda w=w, x=x: gemv_linear(x, w, None) for w in dense] * dense_reps
        )
        row["tinygemm_us"] = graph_us([lambda g=g, x=x: tinygemm(x, g) for g in tiny] * reps)
        row["marlin"] = {}
        compiled = configs[w4a16_marlin.token_tiles(m)]
        # and the first again with K split across two blocks (auto gives one split here)
        for config in compiled + [replace(c, splits=2) for c in compiled[:1]]:
            weights = marlin[config.params]
            if w4a16_marlin.config_unsupported_reason(config, m, n, k, group):
                continue
            entry = errors(marlin_linear(x, weights[0], config), ref)
            entry["us"] = graph_us(
                [lambda w=w, c=config, x=x: marlin_linear(x, w, c) for w in weights] * reps
            )
            row["marlin"][config.name] = entry
        if row["marlin"]:
            best = min(row["marlin"], key=lambda c: row["marlin"][c]["us"])
            row["best"], row["marlin_us"] = best, row["marlin"][best]["us"]
            bf16_us = min(row["cublas_us"], row["pegboard_bf16_us"])
            row["speedup_vs_bf16"] = bf16_us / row["marlin_us"]
            row["speedup_vs_tinygemm"] = row["tinygemm_us"] / row["marlin_us"]
            row["tb_s"] = packed_bytes / row["marlin_us"] / 1e6
        results.append(row)
        print(summary(row), flush=True)
    del layers, marlin, tiny, dense
    torch.cuda.empty_cache()
    return results


def chained_ms(m: int, layouts, configs: dict[str, w4a16_marlin.MarlinConfig]) -> float:
    """ms of one replay of a CUDA graph of the four layers x 32 at M rows, `configs[layer]`
    each, `layouts(layer, params)` its two weight copies (alternating)."""
    xs = {name: torch.randn(m, k, device=DEVICE, dtype=DTYPE) for name, (_, k) in SHAPES.items()}
    calls = [
        lambda x=xs[name], w=layouts(name, c.params)[layer % 2], c=c: marlin_linear(x, w, c)
        for layer in range(32)
        for name, c in configs.items()
    ]
    return graph_us(calls) * len(calls) / 1e3


def chained(results: list, group: int, tried: dict[str, w4a16_marlin.MarlinConfig]) -> dict:
    """Per M whose four layers all ran: {variant: ms} of the chained graph."""
    packed = {
        name: [quantized(n, k, group, seed, asym=True) for seed in (0, 1)]
        for name, (n, k) in SHAPES.items()
    }

    @functools.cache
    def layouts(name: str, params: str) -> list:
        return [to_marlin(p, PARAM_DTYPES[params]) for p in packed[name]]

    out = {}
    for m in sorted({r["m"] for r in results}):
        best = {r["layer"]: tried[r["best"]] for r in results if r["m"] == m and "best" in r}
        if set(best) != set(SHAPES):
            continue
        tiles = w4a16_marlin.token_tiles(m)
        variants = {
            "plugin": {name: w4a16_marlin.layer_config(tiles, *SHAPES[name], group) for name in SHAPES},
            "best": best,
            "best+pdl": {name: replace(c, pdl=True) for name, c in best.items()},
            "best-pdl": {name: replace(c, pdl=False) for name, c in best.items()},
        }  # fmt: skip
        out[m] = {}
        for variant, configs in variants.items():
            try:
                out[m][variant] = chained_ms(m, layouts, configs)
            except (RuntimeError, ValueError) as e:  # (CompileError too) the others go on
                print(f"chained M={m} {variant}: {e}", flush=True)
        print(f"chained M={m}: {out[m]}", flush=True)
    layouts.cache_clear()
    torch.cuda.empty_cache()
    return out


def summary(row: dict) -> str:
    head = f"{row['layer']:<8} M={row['m']:3d}"
    times = (
        f"cuBLAS {row['cublas_us']:7.1f}  pegboard-bf16 {row['pegboard_bf16_us']:7.1f}  "
        f"tinygemm {row['tinygemm_us']:7.1f}"
    )
    if "best" not in row:
        return f"{head}  {times}  marlin: no configuration ran"
    errs = "  ".join(f"{c} {e['us']:.1f}us/{e['rel_error']:.1e}" for c, e in row["marlin"].items())
    return (
        f"{head}  {times}  marlin {row['marlin_us']:7.1f} ({row['best']}, "
        f"{row['speedup_vs_bf16']:.2f}x bf16, {row['speedup_vs_tinygemm']:.2f}x tinygemm, "
        f"{row['tb_s']:.2f} TB/s)\n    all: {errs}\n    bf16 de-quantized via cuBLAS: "
        f"{row['bf16_deq']['rel_error']:.1e} (max {row['bf16_deq']['max_rel_error']:.1e})"
    )


def write_json(args, results: list, chain: dict | None = None) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "group": args.group, "results": results, "chained_ms": chain},
                      f, indent=1)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--layers", default=",".join(SHAPES))
    parser.add_argument("--default-only", action="store_true", help="only each M's default")
    parser.add_argument("--json")
    parser.add_argument("--budget-s", type=float, default=150, help="no new layer after this")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.default_only:
        w4a16_marlin.CANDIDATES = {mt: c[:1] for mt, c in w4a16_marlin.CANDIDATES.items()}
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    start = time.perf_counter()
    configs = compile_all(rows, args.group)
    results = []
    for name in args.layers.split(","):
        if time.perf_counter() - start > args.budget_s:
            print(f"{name}: skipped, past the budget of {args.budget_s:.0f} s", flush=True)
            continue
        n, k = SHAPES[name]
        results.extend(bench_shape(name, n, k, args.group, rows, configs))
        write_json(args, results)  # after every layer: a timeout keeps what was measured
    tried = {
        c.name: c for cs in configs.values() for c in cs + [replace(c, splits=2) for c in cs[:1]]
    }
    chain = chained(results, args.group, tried)
    write_json(args, results, chain)
    table = ["", "layer     M  cuBLAS  pb-bf16  tinygemm  marlin  best                       x bf16  "
             "x tiny  rel err  max rel"]  # fmt: skip
    totals: dict[int, list[float]] = {}
    for r in results:
        if "best" not in r:
            table.append(f"{r['layer']:<8} {r['m']:2d}  no Marlin configuration ran")
            continue
        e = r["marlin"][r["best"]]
        table.append(
            f"{r['layer']:<8}{r['m']:3d} {r['cublas_us']:7.1f} {r['pegboard_bf16_us']:8.1f} "
            f"{r['tinygemm_us']:9.1f} {r['marlin_us']:7.1f}  {r['best']:<24} "
            f"{r['speedup_vs_bf16']:6.2f} {r['speedup_vs_tinygemm']:7.2f}  "
            f"{e['rel_error']:.1e}  {e['max_rel_error']:.1e}"
        )
        t = totals.setdefault(r["m"], [0.0, 0.0, 0.0])
        t[0] += min(r["cublas_us"], r["pegboard_bf16_us"])
        t[1] += r["tinygemm_us"]
        t[2] += r["marlin_us"]
    table.append("one decoder layer's four linears x 32 layers (best bf16 / tinygemm / marlin):")
    for m, (b, tg, ml) in totals.items():
        table.append(
            f"  M={m:3d}  bf16 {b * 32 / 1e3:6.2f} ms  tinygemm {tg * 32 / 1e3:6.2f} ms  "
            f"marlin {ml * 32 / 1e3:6.2f} ms  ({b / ml:.2f}x bf16)"
        )
    table.append("the same chained, one CUDA graph of 32 x 4 layers (PDL edges where on):")
    for m, ms in chain.items():
        table.append(f"  M={m:3d}  " + "  ".join(f"{v} {t:6.2f} ms" for v, t in ms.items()))
    print("\n".join(table))
    if not any("best" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
