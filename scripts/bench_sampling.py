"""Device µs of the Gumbel-max sampling kernel (plugins/sampling/gumbel.py) on the nano-vllm
workload's logits shape, on float32 and bf16 logits, beside a plain argmax and a bf16 ->
float32 copy of the same logits (what the engine skips for a sampler that takes bf16). The
kernel's one-Philox-call-per-token predecessor measured 228.1 µs here (docs/benchmarks.md,
session 7).

    python3 scripts/bench_sampling.py [--rows 256] [--vocab 151936] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing
from pegboard.plugins.sampling.gumbel import gumbel_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device=dev, generator=gen)
    half = logits.to(torch.bfloat16)
    temperature = torch.full((args.rows,), 0.6, device=dev)
    seeds = torch.arange(args.rows, device=dev, dtype=torch.int64)
    out = torch.empty_like(logits)
    cases = {
        "gumbel": lambda: gumbel_sample(logits, temperature, seeds),
        "gumbel on bf16 logits": lambda: gumbel_sample(half, temperature, seeds),
        "argmax (greedy)": lambda: logits.argmax(-1),
        "bf16 -> float32 copy of the logits": lambda: out.copy_(half),
    }
    results = {}
    for name, fn in cases.items():
        results[name] = round(1000 * triton.testing.do_bench(fn, warmup=25, rep=200), 1)
    # the kernel draws from the softmax: token frequencies on a tiny vocab
    small = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=dev).repeat(20000, 1)
    t = torch.ones(20000, device=dev)
    s = torch.arange(20000, device=dev, dtype=torch.int64)
    freq = {"gumbel": (torch.bincount(gumbel_sample(small, t, s), minlength=4) / 20000).tolist()}
    freq["softmax"] = small[0].softmax(-1).tolist()
    for name, us in results.items():
        print(f"{name:40s} {us:8.1f} µs")
    print("frequencies", json.dumps({k: [round(x, 3) for x in v] for k, v in freq.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": args.rows, "vocab": args.vocab, "us": results, "freq": freq}, f, indent=1
            )


if __name__ == "__main__":
    main()
