"""PyTorch's own W4A16 kernel (tinygemm: `torch._weight_int4pack_mm`) on Llama-3.1-8B's linear
shapes at M = 1..64 vs cuBLAS bf16, group 128 (issue 15: measure a well-kept library before
writing a Marlin-class kernel). tinygemm ships inside every CUDA build of torch, so it needs
no carried wheel. Its format: 4-bit codes q in [0, 16), w = (q - 8) * scale + zero per group
(scale and zero in bf16, [K / group, N, 2]), weights packed by `_convert_weight_to_int4pack`
for `inner_k_tiles` 2, 4 or 8 (each tried; the fastest counts). Every case is checked against
x @ the de-quantized weights.

    python3 scripts/bench_int4pack.py [--rows 1,4,16,32,64] [--group 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from bench_gemv import graph_us, relative_error  # scripts/bench_gemv.py (same folder)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
ROTATE_BYTES = 2 * 60 * 2**20 * 2  # twice an H200's L2, and some: every call reads from HBM


def quantized(n: int, k: int, group: int, seed: int):
    """Codes [n, k] in uint8 and bf16 scales/zeros [k / group, n, 2]."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, device=DEVICE, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=gen, device=DEVICE) * 0.004 + 0.001
    zeros = (torch.rand(k // group, n, generator=gen, device=DEVICE) - 0.5) * 0.01
    return q, torch.stack([scales, zeros], -1).to(DTYPE)


def dequantized(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    scale = sz[..., 0].float().T.repeat_interleave(group, 1)  # [n, k]
    zero = sz[..., 1].float().T.repeat_interleave(group, 1)
    return (q.float() - 8) * scale + zero


def packed(q: torch.Tensor, inner_k_tiles: int, high_first: bool) -> torch.Tensor:
    a, b = q[:, ::2].int(), q[:, 1::2].int()
    byte = (a << 4 | b) if high_first else (b << 4 | a)
    return torch._convert_weight_to_int4pack(byte.to(torch.uint8), inner_k_tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(torch.cuda.get_device_name(), torch.__version__)
    # which nibble of a byte is the even column (it changed across torch versions): the order
    # whose result matches the de-quantized weights
    q, sz = quantized(256, 512, args.group, 0)
    x = torch.randn(4, 512, device=DEVICE, dtype=DTYPE)
    ref = x.float() @ dequantized(q, sz, args.group).T
    errs = {
        hf: relative_error(torch._weight_int4pack_mm(x, packed(q, 8, hf), args.group, sz), ref)
        for hf in (True, False)
    }
    high_first = min(errs, key=errs.get)
    print(f"nibble order: high first {high_first} (errors {errs})")
    results, totals = [], {m: [0.0, 0.0] for m in rows}
    for name, (n, k) in SHAPES.items():
        copies = min(64, max(2, math.ceil(ROTATE_BYTES / (n * k // 2))))
        layers = [quantized(n, k, args.group, s) for s in range(copies)]
        dense = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) for _ in range(min(copies, 8))]
        ref_w = dequantized(*layers[0], args.group)
        for m in rows:
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            bf16 = graph_us([lambda w=w, x=x: x @ w.T for w in dense] * 4)
            best = None
            for tiles in (2, 4, 8):
                if k % (tiles * 16):
                    continue
                ws = [(packed(q_, tiles, high_first), sz_) for q_, sz_ in layers]
                us = graph_us(
                    [
                        lambda w=w, s=s, x=x: torch._weight_int4pack_mm(x, w, args.group, s)
                        for w, s in ws
                    ]
                )
                out = torch._weight_int4pack_mm(x, ws[0][0], args.group, ws[0][1])
                err = relative_error(out, x.float() @ ref_w.T)
                if best is None or us < best["us"]:
                    best = {"us": us, "inner_k_tiles": tiles, "rel_error": err}
                del ws
            row = {"layer": name, "m": m, "bf16_us": bf16, **best}
            row["speedup"] = bf16 / best["us"]
            row["tb_s"] = n * k / 2 / best["us"] / 1e6
            results.append(row)
            totals[m][0] += bf16
            totals[m][1] += best["us"]
            print(
                f"{name:<8} M={m:3d}  cuBLAS {bf16:7.1f} µs  tinygemm {best['us']:7.1f} µs "
                f"({row['speedup']:4.2f}x, {row['tb_s']:4.2f} TB/s packed, tiles "
                f"{best['inner_k_tiles']}, err {best['rel_error']:.1e})"
            )
    print("one decoder layer's linears (qkv + o + gate_up + down), 32 layers:")
    for m, (b, t) in totals.items():
        print(
            f"  M={m:3d}  bf16 {b * 32 / 1e3:6.2f} ms  tinygemm {t * 32 / 1e3:6.2f} ms  {b / t:4.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "group": args.group,
                    "high_first": high_first,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
