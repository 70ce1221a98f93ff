"""One MoE layer's routed experts: the fused Triton kernel against the PyTorch path, on a GPU.

Qwen3-30B-A3B's experts (128 experts, top-8, hidden 2048, intermediate 768, bf16, random
weights and uniform random routing) at M = 1, 8, 64, 256, 2048 and 8192 tokens (8192: the
engine's default token budget of a prefill step, `--max-num-batched-tokens`):

- `torch`: `MoEExperts.forward` (gathered mat-vecs up to 64 pairs, else one GEMM pair per
  expert after a host sync), eager;
- `fused`: `fused_experts` with `choose_config`'s plan, eager and replayed from a CUDA graph
  (as a decode step runs it);

times are medians (µs) over calls that rotate through 4 routings, so at small M the experts'
weights come from device memory, not L2; GB/s counts the weights of the experts each call
touches. `err` is the fused output's relative error against the PyTorch path's. `--sweep`
also times candidate launch configurations per M (CUDA graph) and prints the fastest, for
`CONFIGS` in `pegboard.core.kernels.fused_moe`. Run on the lent machine
(`bash scripts/device-run.sh moe`):

    python3 scripts/bench_moe.py [--tokens 1,8,64,256,2048,8192] [--sweep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace

import torch
from pegboard.core.kernels.fused_moe import (
    DIRECT_MAX_PAIRS,
    GemmConfig,
    MoEConfig,
    choose_config,
    fused_experts,
)
from pegboard.core.models.moe import MoEExperts

EXPERTS, TOP_K, HIDDEN, SIZE = 128, 8, 2048, 768  # Qwen3-30B-A3B
ROUTINGS = 4
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16


def routings(tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    cases = []
    for _ in range(ROUTINGS):
        x = torch.randn(tokens, HIDDEN, generator=gen, device=DEVICE).to(DTYPE)
        scores = torch.rand(tokens, EXPERTS, generator=gen, device=DEVICE)
        weights, ids = scores.topk(TOP_K, dim=-1)
        cases.append((x, ids, (weights / weights.sum(-1, keepdim=True)).to(DTYPE)))
    return cases


def median_us(run, cases, iters: int) -> float:
    """Median µs per call, eager, cycling through `cases`."""
    for case in cases:
        run(*case)
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(*cases[i % len(cases)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_us(run, cases, iters: int) -> float:
    """Median µs per call replaying one CUDA graph per case (after an eager warm-up)."""
    graphs = []
    for case in cases:
        run(*case)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(*case)
        graphs.append(graph)
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[i % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def candidates(tokens: int) -> list[MoEConfig]:
    """Launch plans worth timing at `tokens` (the default plan first)."""
    plans = [choose_config(tokens, TOP_K, EXPERTS)]
    if tokens * TOP_K <= 2 * DIRECT_MAX_PAIRS:
        direct = MoEConfig(GemmConfig(16, 32, 128), GemmConfig(16, 64, 128), direct=True)
        plans += [direct, replace(direct, direct=False)]
        plans += [
            MoEConfig(GemmConfig(16, n, k, 1, 4, 4), GemmConfig(16, 2 * n, k, 1, 4, 4), d)
            for n, k in ((16, 128), (64, 64), (64, 256), (32, 256))
            for d in (True, False)
        ]
    per_expert = tokens * TOP_K / EXPERTS
    for m in (16, 32, 64, 128):
        if m > 4 * max(per_expert, 4):
            continue
        for n, k, warps, stages in (
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
            (32, 128, 4, 4),
        ):
            plans.append(
                MoEConfig(
                    GemmConfig(m, n, k, 16 if m > 16 else 1, warps, stages),
                    GemmConfig(m, 2 * n, k, 16 if m > 16 else 1, warps, stages),
                )
            )
    return list(dict.fromkeys(plans))


def describe(plan: MoEConfig) -> str:
    """`direct|sorted up M×N×K/g G w W s S down ...` in one line."""

    def gemm(c: GemmConfig) -> str:
        return f"{c.block_m}x{c.block_n}x{c.block_k}/g{c.group_m}w{c.num_warps}s{c.num_stages}"

    layout = "direct" if plan.direct else "sorted"
    return f"{layout} up {gemm(plan.gate_up)} down {gemm(plan.down)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,64,256,2048,8192")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--sweep", action="store_true", help="time candidate launch configurations")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    experts = MoEExperts(EXPERTS, HIDDEN, SIZE, {}, "experts").to(DEVICE, DTYPE)
    experts.w13.data.normal_(0, HIDDEN**-0.5)
    experts.w2.data.normal_(0, SIZE**-0.5)
    w13, w2 = experts.w13.data, experts.w2.data
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()

    def fused(x, ids, weights, config=None):
        return fused_experts(x, ids, weights, w13, w2, config)

    rows = []
    print(
        f"{'M':>5} {'pairs':>6} {'experts':>7} {'torch µs':>9} {'fused µs':>9} "
        f"{'graph µs':>9} {'speedup':>7} {'GB/s':>6} {'err':>8}  plan"
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        cases = routings(tokens)
        touched = statistics.mean(len(torch.unique(ids)) for _, ids, _ in cases)
        torch_us = median_us(experts, cases, args.iters)
        fused_us = median_us(fused, cases, args.iters)
        replay_us = graph_us(fused, cases, args.iters)
        x, ids, weights = cases[0]
        ref = experts(x, ids, weights).double()
        err = ((fused(x, ids, weights).double() - ref).norm() / ref.norm()).item()
        plan = choose_config(tokens, TOP_K, EXPERTS)
        row = dict(
            tokens=tokens,
            pairs=tokens * TOP_K,
            experts_touched=touched,
            torch_us=torch_us,
            fused_us=fused_us,
            fused_graph_us=replay_us,
            weight_gbs=touched * expert_bytes / replay_us / 1e3,
            rel_err=err,
            plan=asdict(plan),
        )
        print(
            f"{tokens:>5} {tokens * TOP_K:>6} {touched:>7.1f} {torch_us:>9.1f} {fused_us:>9.1f} "
            f"{replay_us:>9.1f} {torch_us / fused_us:>6.1f}x {row['weight_gbs']:>6.0f} "
            f"{err:>8.1e}  {describe(plan)}"
        )
        if args.sweep:
            timed = []
            for config in candidates(tokens):
                try:
                    timed.append(
                        (
                            graph_us(lambda *c, cfg=config: fused(*c, cfg), cases, args.iters // 2),
                            config,
                        )
                    )
                except Exception as e:  # a plan this GPU cannot compile (shared memory)
                    print(f"        skipped {describe(config)}: {type(e).__name__}")
            timed.sort(key=lambda t: t[0])
            for us, config in timed[:3]:
                print(f"        {us:>8.1f} µs  {describe(config)}")
            row["sweep"] = [dict(us=us, config=asdict(c)) for us, c in timed]
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
