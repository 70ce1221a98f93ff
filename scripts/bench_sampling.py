"""Device µs and TB/s of the sampling kernels (plugins/sampling/gumbel.py) per logits shape:
1, 64 and 256 rows of the Qwen3 (151,936) and Llama-3 (128,256) vocabularies, bf16 logits
(what the engine passes).

Per shape: the session-7 configuration (Philox noise, 16,384-entry chunks: its kernel, which
measured 203.7 µs at 256 x 151,936 on the H200, docs/benchmarks.md), the Philox noise with
today's chunking (a seed's tokens unchanged), the Philox noise with `lg2.approx`, the hash noise
with accurate `log2`, the hash noise as served, and greedy: the noiseless kernel beside
`torch.argmax`. Checks, printed: the session-7 configuration and today's Philox path give the
same tokens; how many of the 256 rows the approximate logarithm changes; the drawn frequencies
of each noise against the softmax (chi-square, 5 degrees of freedom: above ~26 is a defect).
`--sweep`: the hash kernel's block size and programs per call at 256 x 151,936.

    python3 scripts/bench_sampling.py [--rows 1,64,256] [--vocab 151936,128256] [--sweep]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton
import triton.testing
from pegboard.plugins.sampling import gumbel
from pegboard.plugins.sampling.gumbel import argmax, gumbel_sample

SESSION7_CHUNK = 16384  # the kernel's fixed chunk until the chunk followed the batch


def timed(fn) -> float:
    return round(1000 * triton.testing.do_bench(fn, warmup=25, rep=150), 1)


def shape_cases(rows: int, vocab: int, dtype: torch.dtype) -> tuple[dict, dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(rows)
    logits = (3 * torch.randn(rows, vocab, device=dev, generator=gen)).to(dtype)
    inv = gumbel.inverse_temperature(torch.full((rows,), 0.6, device=dev))
    seeds = torch.randint(0, 2**62, (rows,), device=dev, generator=gen)

    def draw(**kw):
        return lambda: gumbel_sample(logits, None, seeds, inv_temperature=inv, **kw)

    cases = {
        "session 7 (philox, chunk 16384)": draw(noise="philox", chunk=SESSION7_CHUNK),
        "philox (tokens unchanged)": draw(noise="philox"),
        "philox, lg2.approx": draw(noise="philox", approx_log=True),
        "hash, accurate log2": draw(noise="hash", approx_log=False),
        "hash (served)": draw(noise="hash"),
        "argmax, triton (served)": lambda: argmax(logits),
        "argmax, torch": lambda: logits.argmax(-1),
    }
    checks = {
        "session 7 == philox": bool(
            torch.equal(cases[next(iter(cases))](), draw(noise="philox")())
        ),
        "rows lg2.approx changes (philox)": int(
            (draw(noise="philox")() != draw(noise="philox", approx_log=True)()).sum()
        ),
        "rows lg2.approx changes (hash)": int(
            (draw(noise="hash", approx_log=False)() != draw(noise="hash")()).sum()
        ),
        "triton argmax == torch": bool(torch.equal(argmax(logits), logits.argmax(-1))),
    }
    return {name: timed(fn) for name, fn in cases.items()}, checks


def frequencies() -> dict:
    """Each noise's draws on six tokens, 60,000 seeds, against the softmax: chi-square."""
    dev = torch.device("cuda")
    logits = torch.tensor([0.9, 0.6, 0.3, 0.0, -0.3, -0.8], device=dev)
    n, temperature = 60000, 0.8
    t = torch.full((n,), temperature, device=dev)
    seeds = torch.arange(n, device=dev, dtype=torch.int64)
    expected = (logits.double() / temperature).softmax(-1) * n
    out = {"softmax": (expected / n).tolist()}
    for noise in gumbel.NOISES:
        observed = torch.bincount(
            gumbel_sample(logits.repeat(n, 1), t, seeds, noise=noise), minlength=6
        )
        chi = float(((observed.double() - expected) ** 2 / expected).sum())
        out[noise] = {"freq": (observed / n).tolist(), "chi_square": round(chi, 2)}
    return out


def sweep(dtype: torch.dtype) -> dict:
    """The hash kernel at 256 x 151,936 per block size and target programs."""
    dev = torch.device("cuda")
    rows, vocab = 256, 151936
    logits = torch.randn(rows, vocab, device=dev).to(dtype)
    inv = gumbel.inverse_temperature(torch.full((rows,), 0.6, device=dev))
    seeds = torch.arange(rows, device=dev, dtype=torch.int64)
    draw = functools.partial(gumbel_sample, logits, None, seeds, inv_temperature=inv)
    out = {}
    for block in (512, 1024, 2048, 4096):
        for programs in (1024, 2048, 4096, 8192, 16384):
            chunk = triton.cdiv(triton.cdiv(vocab, triton.cdiv(programs, rows)), block) * block
            tiles = {"chunk": chunk, "block": block}
            name = f"block {block}, ~{programs} programs (chunk {chunk})"
            out[name] = timed(functools.partial(draw, **tiles))
            out[f"argmax: {name}"] = timed(functools.partial(argmax, logits, **tiles))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,256")
    parser.add_argument("--vocab", default="151936,128256")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size = torch.finfo(dtype).bits // 8
    result = {"dtype": args.dtype, "shapes": {}}
    for vocab in map(int, args.vocab.split(",")):
        for rows in map(int, args.rows.split(",")):
            us, checks = shape_cases(rows, vocab, dtype)
            print(f"--- {rows} x {vocab} {args.dtype} ({rows * vocab * size / 1e6:.1f} MB)")
            for name, t in us.items():
                print(f"  {name:34s} {t:8.1f} µs {rows * vocab * size / t / 1e6:6.2f} TB/s")
            print("  checks", json.dumps(checks))
            result["shapes"][f"{rows}x{vocab}"] = {"us": us, "checks": checks}
    result["frequencies"] = frequencies()
    print("frequencies", json.dumps(result["frequencies"]))
    if args.sweep:
        result["sweep"] = sweep(dtype)
        for name, t in sorted(result["sweep"].items(), key=lambda kv: kv[1]):
            print(f"  {name:50s} {t:8.1f} µs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
