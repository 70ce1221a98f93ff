"""The collectives of one expert-parallel MoE layer over N ranks, timed per batch size.

pegboard's EP keeps the attention tensor-parallel, so every rank holds the whole batch and one
all-reduce of `[T, H]` combines the experts' partial outputs (`core/moe/expert_parallel.py`).
Engines that split the tokens over the ranks (data-parallel attention) move them instead:

- `all_reduce`      pegboard: all-reduce `[T, H]`;
- `ag_rs`           all-gather the ranks' `[T/N, H]` tokens, reduce-scatter the `[T, H]` output;
- `all_to_all`      dispatch each token to its top-k experts' ranks and back: two all-to-alls of
                    `[k * T / N, H]` (uniform routing: each rank sends `1/N` of its rows to each).

Usage: python scripts/bench_ep_comm.py [--ranks 2] [--device cuda] [--json out.json]
(spawns the ranks itself; NCCL on CUDA, gloo on the CPU for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS = (1, 8, 32, 128, 512, 2048, 8192)


def collectives(t: int, hidden: int, k: int, n: int, device: str, dtype: torch.dtype) -> dict:
    """name -> a function running that layer's collectives once for `t` tokens."""
    whole = torch.randn(t, hidden, device=device, dtype=dtype)
    share = max(t // n, 1)
    mine = torch.randn(share, hidden, device=device, dtype=dtype)
    gathered = torch.empty(share * n, hidden, device=device, dtype=dtype)
    rows = share * k - (share * k) % n or n  # rows sent, a multiple of n
    send = torch.randn(rows, hidden, device=device, dtype=dtype)
    recv = torch.empty_like(send)

    def all_reduce() -> None:
        dist.all_reduce(whole)

    def ag_rs() -> None:
        dist.all_gather_into_tensor(gathered, mine)
        dist.reduce_scatter_tensor(mine, gathered)

    def all_to_all() -> None:
        dist.all_to_all_single(recv, send)
        dist.all_to_all_single(send, recv)

    return {"all_reduce": all_reduce, "ag_rs": ag_rs, "all_to_all": all_to_all}


def timed(fn, device: str, iters: int) -> float:
    """Mean microseconds per call after warm-up."""
    for _ in range(3):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def rank_main(rank: int, args: argparse.Namespace, addr: str, results) -> None:
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://{addr}", rank=rank, world_size=args.ranks
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    warnings.filterwarnings("ignore", category=FutureWarning)  # reduce_scatter_tensor's rename
    rows = []
    for t in args.tokens:
        row = {"tokens": t}
        for name, fn in collectives(t, args.hidden, args.top_k, args.ranks, device, dtype).items():
            try:
                row[name + "_us"] = round(timed(fn, device, args.iters), 1)
            except RuntimeError as e:  # gloo lacks some collectives
                row[name + "_us"] = None
                row.setdefault("errors", {})[name] = str(e).splitlines()[0]
        rows.append(row)
    if rank == 0:
        results.extend(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from pegboard.core.distributed.topology import free_address

    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(rank_main, args=(args, free_address(), results), nprocs=args.ranks)
        rows = list(results)
    print(f"{'tokens':>7} {'all_reduce':>11} {'ag_rs':>11} {'all_to_all':>11}   (us per MoE layer)")
    for r in rows:
        cells = [f"{r[n + '_us']:>11}" for n in ("all_reduce", "ag_rs", "all_to_all")]
        print(f"{r['tokens']:>7} " + " ".join(cells))
    if args.json:
        meta = {
            "ranks": args.ranks,
            "device": args.device,
            "hidden": args.hidden,
            "top_k": args.top_k,
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
