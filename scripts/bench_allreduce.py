"""Time one small all-reduce per implementation, as TP decode runs them (issue 11).

Run on two GPUs:  python3 -m torch.distributed.run --nproc-per-node 2 scripts/bench_allreduce.py
Each variant all-reduces a bf16 [rows, hidden] tensor `--count` times back to back inside one
CUDA graph (as a decode step's 2 per layer do) and reports µs per all-reduce on rank 0:
NCCL, torch's symmetric-memory one-shot with the staging copy (pegboard's unfused path), the
same without the copy (the input written straight into the symmetric buffer), and the two-shot;
then what a decoder does after each o/down projection at decode sizes: the unfused path
(staging copy, one-shot, then the add + RMSNorm kernel) against the fused kernel
(`pegboard.core.distributed.fused_norm`: barrier, sum of the peers, residual add and RMSNorm
in one kernel), and the add + RMSNorm kernel alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os

import torch
import torch.distributed as dist
from pegboard.core.distributed.fused_norm import FusedAllReduceNorm
from pegboard.core.kernels.norm import rms_norm


def timed(fn, count: int, reps: int) -> float:
    """µs per call of `fn`, `count` calls captured in one CUDA graph, best of `reps` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            fn()
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / count)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level="INFO")  # why the fused path is off, should it be
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    group = dist.group.WORLD
    import torch.distributed._symmetric_memory as symm_mem

    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(group.group_name)
    buf = symm_mem.empty(1 << 22, dtype=torch.uint8, device="cuda")
    symm_mem.rendezvous(buf, group.group_name)
    name = group.group_name
    fused = FusedAllReduceNorm.create(
        group, torch.device("cuda", torch.cuda.current_device()), args.hidden, torch.bfloat16, None
    )
    if fused is None and rank == 0:
        print("  fused all-reduce + RMSNorm: unavailable (the reason is in the log, stderr)")
    weight = torch.ones(args.hidden, device="cuda", dtype=torch.bfloat16)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.hidden, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn_like(x)
        staged = buf[: x.numel() * 2].view(torch.bfloat16).view(x.shape)
        variants = {
            "nccl": lambda x=x: dist.all_reduce(x, group=group),
            "symm one-shot + copy (today)": lambda x=x, s=staged: (
                torch.ops.symm_mem.one_shot_all_reduce(s.copy_(x), "sum", name)
            ),
            "symm one-shot, no copy": lambda s=staged: torch.ops.symm_mem.one_shot_all_reduce(
                s, "sum", name
            ),
            "symm two-shot (in place)": lambda s=staged: torch.ops.symm_mem.two_shot_all_reduce_(
                s, "sum", name
            ),
            "copy only (bf16, same size)": lambda x=x, s=staged: s.copy_(x),
            "unfused: copy + one-shot + add&norm": lambda x=x, s=staged, r=residual: rms_norm(
                torch.ops.symm_mem.one_shot_all_reduce(s.copy_(x), "sum", name), weight, 1e-5, r
            ),
            "add&norm kernel alone": lambda x=x, r=residual: rms_norm(x, weight, 1e-5, r),
        }
        if fused is not None and fused.takes(rows):
            slots = itertools.cycle((0, 1))  # o, down, o, ...: as the decoder alternates them
            variants["fused: all-reduce+add+norm kernel"] = lambda r=residual, k=slots: (
                fused.add_norm(next(k), r, weight, 1e-5)
            )
        for label, fn in variants.items():
            try:
                us = timed(fn, args.count, args.reps)
            except Exception as e:  # an op this torch build lacks
                us = None
                if rank == 0:
                    print(f"  {label}: {type(e).__name__}: {str(e)[:120]}")
            results.append({"rows": rows, "variant": label, "us": us})
    if rank == 0:
        print(f"µs per all-reduce of bf16 [rows, {args.hidden}], {args.count} in one CUDA graph")
        for r in results:
            us = "—" if r["us"] is None else f"{r['us']:.2f}"
            print(f"{r['rows']:>5}  {r['variant']:<36} {us}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    if fused is not None:
        fused.release()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
