"""Does prefetching the o projection's weights into the L2 during attention pay? (issue 17)

A stand-in for Llama-3.1-8B batch-1 decode's attention half, per layer, captured in one CUDA
graph over 32 layers' own weights (so no layer finds its weights in the L2 from the last replay):
the qkv GEMV (6144 x 4096), optionally `l2_prefetch.prefetch(o)` in one of its variants, a spin
kernel standing for rope + attention + reduce (`--gap-us`), then the o GEMV (4096 x 4096). Prints
µs per layer for each variant, the prefetch kernel's own duration, and the o GEMV cold / from
the L2. One H200, ~1 min:

    python3 scripts/bench_l2_prefetch.py [--gap-us 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from pegboard.core.kernels import dense, l2_prefetch

LAYERS = 32
HIDDEN, QKV = 4096, 6144

VARIANTS = {
    "none": None,
    "bulk-16k-p32": {},
    "bulk-64k-p32": {"chunk": 65536},
    "bulk-4k-p32": {"chunk": 4096},
    "bulk-16k-p4": {"per_program": 4},
    "bulk-16k-p32-nopdl": {"pdl": False},
    "bulk-16k-p32-ev": {"evict_last": True},
    "lines-p256": {"lines": True, "per_program": 256},
    "lines-p1024": {"lines": True, "per_program": 1024},
    "lines-p256-nopdl": {"lines": True, "per_program": 256, "pdl": False},
    "lines-p256-ev": {"lines": True, "per_program": 256, "evict_last": True},
    "side-bulk-16k-p32": {"side": True},
    "side-lines-p256": {"side": True, "lines": True, "per_program": 256},
    "side-lines-p1024": {"side": True, "lines": True, "per_program": 1024},
    "side-lines-p256-nopdl": {"side": True, "lines": True, "per_program": 256, "pdl": False},
}


def spin_cycles(gap_us: float) -> int:
    """Cycles of `torch.cuda._sleep` that take `gap_us` on this device (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    return int(1_000_000 * gap_us / (start.elapsed_time(end) * 1000))


def timed_graph(body, replays: int = 20) -> float:
    """µs per layer of `body()` (32 layers) captured once and replayed."""
    body()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap-us", type=float, default=10.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    qkv = [torch.randn(QKV, HIDDEN, device=dev, dtype=torch.bfloat16) / 64 for _ in range(LAYERS)]
    o = [torch.randn(HIDDEN, HIDDEN, device=dev, dtype=torch.bfloat16) / 64 for _ in range(LAYERS)]
    x = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    att = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    cycles = spin_cycles(args.gap_us)
    side = torch.cuda.Stream()
    results: dict[str, float] = {}

    def layers(variant: dict | None, gap: bool = True) -> None:
        forked = False
        for i in range(LAYERS):
            dense.linear(x, qkv[i], None)
            if variant is not None:
                options = {k: v for k, v in variant.items() if k != "side"}
                if variant.get("side"):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        l2_prefetch.prefetch(o[i], **options)
                    forked = True
                else:
                    l2_prefetch.prefetch(o[i], **options)
            if gap:
                torch.cuda._sleep(cycles)
            dense.linear(att, o[i], None)
        if forked:
            torch.cuda.current_stream().wait_stream(side)

    results["no-gap"] = timed_graph(lambda: layers(None, gap=False))
    results["gap-only"] = timed_graph(lambda: [torch.cuda._sleep(cycles) for _ in range(LAYERS)])
    for name, variant in VARIANTS.items():
        try:
            results[name] = timed_graph(lambda v=variant: layers(v))
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest run
            print(f"{name}: failed: {type(e).__name__}: {e}")

    # Without the qkv GEMV: the o GEMV twice in a row (the second from the L2 if 33.5 MB stay
    # there), and after a line prefetch of its first MB (8-32) plus the gap.
    def twice() -> None:
        for i in range(LAYERS):
            dense.linear(att, o[i], None)
            dense.linear(att, o[i], None)

    results["o-twice (2 GEMVs)"] = timed_graph(twice)
    results["o-once"] = timed_graph(lambda: [dense.linear(att, o[i], None) for i in range(LAYERS)])
    F = torch.nn.functional
    results["cublas o-twice"] = timed_graph(
        lambda: [(F.linear(att, o[i]), F.linear(att, o[i])) for i in range(LAYERS)]
    )
    results["cublas o-once"] = timed_graph(lambda: [F.linear(att, o[i]) for i in range(LAYERS)])
    half = [w[: HIDDEN // 2] for w in o]  # 16 MB
    results["half-o twice"] = timed_graph(
        lambda: [
            (dense.linear(att, half[i], None), dense.linear(att, half[i], None))
            for i in range(LAYERS)
        ]
    )
    results["half-o once"] = timed_graph(
        lambda: [dense.linear(att, half[i], None) for i in range(LAYERS)]
    )
    for mb in (8, 16, 24, 32):

        def ahead(mb=mb) -> None:
            for i in range(LAYERS):
                l2_prefetch.prefetch(o[i], mb * 2**20, lines=True, per_program=256, pdl=False)
                torch.cuda._sleep(cycles)
                dense.linear(att, o[i], None)

        results[f"lines {mb}MB + gap + o"] = timed_graph(ahead)
    results["gap + o"] = timed_graph(
        lambda: [(torch.cuda._sleep(cycles), dense.linear(att, o[i], None)) for i in range(LAYERS)]
    )
    # The prefetch kernel alone and the o GEMV cold / warm, eager, events around each.
    flush = torch.empty(256 * 2**20, device=dev, dtype=torch.uint8)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def event_us(fn) -> float:
        flush.zero_()
        fn()
        flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000

    results["kernel-bulk-16k-p32"] = event_us(lambda: l2_prefetch.prefetch(o[0]))
    results["kernel-lines-p256"] = event_us(
        lambda: l2_prefetch.prefetch(o[0], lines=True, per_program=256)
    )
    results["o-gemv-cold"] = event_us(lambda: dense.linear(att, o[0], None))

    def warm() -> None:
        dense.linear(att, o[0], None)
        start.record()
        dense.linear(att, o[0], None)

    flush.zero_()
    warm()
    end.record()
    torch.cuda.synchronize()
    results["o-gemv-after-o-gemv"] = start.elapsed_time(end) * 1000
    print(f"\ngap {args.gap_us} µs = {cycles} cycles; µs per layer (qkv + [prefetch] + gap + o):")
    for name, us in results.items():
        print(f"  {name:24s} {us:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gap_us": args.gap_us, "cycles": cycles, "us": results}, f, indent=1)


if __name__ == "__main__":
    main()
