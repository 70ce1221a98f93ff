"""Host cost of cuBLAS at row counts it has not seen (issue 14).

Session 19's `spec-probe` found the EAGLE head's eager catch-up spending 1.4-8.5 ms in its five
linears (`F.linear`, 2-6k rows, a new row count each time), aten::mm's host self time ~0.75 ms
per call, while the device kernels take well under that. This times, on the head's weight
shapes (Qwen3-0.6B's EAGLE-3 layer), `F.linear` with the device synchronized around it: the
first call at a row count (new), the second at the same count (seen), and row counts rounded
up to a multiple of `--bucket` (the fix under test: few distinct shapes); then the torch
profiler's view of a few first calls (CUDA runtime calls inside aten::mm).

    python3 scripts/probe_linear_shapes.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(1024, 3072), (4096, 2048), (1024, 2048), (6144, 1024), (1024, 3072)]  # (N, K)


def timed(x, w) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    F.linear(x, w)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--bucket", type=int, default=512)
    args = p.parse_args()
    dev = torch.device("cuda")
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for n, k in SHAPES]
    big = torch.randn(9000, 3072, device=dev, dtype=torch.bfloat16)
    for w in weights:  # cuBLAS's handle and workspace, one shape
        timed(big[:4096, : w.shape[1]], w)
    rng = random.Random(0)
    rows = rng.sample(range(1000, 8000), 12)
    result = {"rows": rows, "new": [], "seen": [], "bucketed": []}
    for m in rows:
        new = sum(timed(big[:m, : w.shape[1]].contiguous(), w) for w in weights)
        seen = sum(timed(big[:m, : w.shape[1]].contiguous(), w) for w in weights)
        b = -(-m // args.bucket) * args.bucket
        bucketed = sum(timed(big[:b, : w.shape[1]].contiguous(), w) for w in weights)
        result["new"].append(round(new, 3))
        result["seen"].append(round(seen, 3))
        result["bucketed"].append(round(bucketed, 3))
    # the device's time for one such set (events), at the last row count
    xs = [big[: rows[-1], : w.shape[1]].contiguous() for w in weights]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for x, w in zip(xs, weights):
        F.linear(x, w)
    end.record()
    torch.cuda.synchronize()
    result["device_only"] = round(start.elapsed_time(end), 3)
    print(f"{'rows':>6} {'new ms':>8} {'seen ms':>8} {'bucket ms':>10}  (5 linears, synced)")
    for m, a, b, c in zip(rows, result["new"], result["seen"], result["bucketed"]):
        print(f"{m:6d} {a:8.3f} {b:8.3f} {c:10.3f}")
    print(f"device time of the 5 linears at {rows[-1]} rows: {result['device_only']} ms")
    fresh = rng.sample(range(8001, 9000), 3)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for m in fresh:
            for w in weights:
                timed(big[:m, : w.shape[1]].contiguous(), w)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    result["profile"] = table
    for env in ("CUDA_MODULE_LOADING", "CUBLAS_WORKSPACE_CONFIG", "TORCH_BLAS_PREFER_CUBLASLT"):
        result[env] = os.environ.get(env)
    result["blas"] = str(torch.backends.cuda.preferred_blas_library())
    print("preferred blas:", result["blas"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
