"""Host µs per call of the primitives a step loop is made of, on this machine (issue 17).

python3 scripts/host_primitives.py [--calls 2000] [--rows 256] [--json FILE]

The lent H200s' hosts run the same Python 1.5-3x slower than the development CPU and differ
between calls (docs/benchmarks.md, sessions 15-17), and `HostProfile` books each phase as a
whole. This times the pieces one by one, host wall clock only (the device is idle or its work
is not waited for; a synchronize between rounds keeps queues short):

- numpy and torch CPU work of the size a 256-request step has: a `fromiter` pass over request
  objects, a torch slice + views of a 16 MiB buffer, `torch.from_numpy`, `torch.as_tensor` of a
  list;
- on CUDA: `torch.empty` on the device, `torch.cuda.current_stream(device)` (and the raw
  handle the pinned ring keys streams by),
  `is_current_stream_capturing`, `sdk.device.to_device` of a numpy array (the pinned ring), a
  device slice and a device-to-device `copy_` (a CUDA graph's static inputs), a trivial Triton
  launch, the Gumbel sampler's two launches at `--rows` x 151,936, a CUDA graph replay of 1 and of
  300 small kernels (a decode graph has ~300-500 nodes).

Prints `name  µs per call` (the median of 5 rounds), and writes the same with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def timed(fn, calls: int, rounds: int = 5, sync=None) -> float:
    """Median over `rounds` of the host µs per call of `fn` (`sync` between rounds)."""
    fn()  # warm: compile, allocate, cache
    per = []
    for _ in range(rounds):
        if sync is not None:
            sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per)


class _Request:  # what the passes over a batch read
    def __init__(self, i: int) -> None:
        self.num_computed_tokens = 100 + i
        self.token_ids = list(range(101 + i))
        self.output_token_ids = list(range(i % 7))


def cpu_cases(rows: int) -> dict:
    requests = [_Request(i) for i in range(rows)]
    buf = torch.empty(16 << 20, dtype=torch.uint8)
    array = np.arange(1100, dtype=np.int64)
    values = list(range(rows))
    return {
        f"fromiter pass over {rows} requests": lambda: np.fromiter(
            [r.num_computed_tokens for r in requests], np.int64, rows
        ),
        "torch slice + 2 views of 16 MiB (CPU)": lambda: (
            buf[4096:12896].view(torch.int64).view(1100)
        ),
        "torch.from_numpy (1,100 int64)": lambda: torch.from_numpy(array),
        f"torch.as_tensor(list of {rows}, int64)": lambda: torch.as_tensor(
            values, dtype=torch.int64
        ),
        f"np.asarray(list of {rows}, int64)": lambda: np.asarray(values, dtype=np.int64),
    }


def cuda_cases(rows: int) -> dict:
    import triton
    import triton.language as tl
    from pegboard.plugins.sampling.gumbel import gumbel_sample
    from pegboard.sdk.device import to_device

    dev = torch.device("cuda")
    array, values = np.arange(1100, dtype=np.int64), list(range(rows))
    src = torch.zeros(rows, dtype=torch.int64, device=dev)
    dst = torch.zeros(4096, dtype=torch.int64, device=dev)
    one = torch.zeros(1, device=dev)

    @triton.jit
    def _touch(x):
        tl.store(x, tl.load(x) + 1.0)

    logits = torch.randn(rows, 151936, dtype=torch.bfloat16, device=dev)
    inv = torch.full((rows,), 1 / 0.6, device=dev)
    states = torch.arange(rows, dtype=torch.int64, device=dev)

    def graph(kernels: int) -> torch.cuda.CUDAGraph:
        g, x = torch.cuda.CUDAGraph(), torch.zeros(16, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x.add_(1)  # warm outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            for _ in range(kernels):
                x.add_(1)
        return g

    g1, g300 = graph(1), graph(300)
    return {
        "torch.empty(1,100 int64, cuda)": lambda: torch.empty(1100, dtype=torch.int64, device=dev),
        "torch.cuda.current_stream(device)": lambda: torch.cuda.current_stream(dev),
        "torch._C._cuda_getCurrentRawStream (the ring's key)": (
            lambda: torch._C._cuda_getCurrentRawStream(dev.index or 0)
        ),
        "torch.cuda.is_current_stream_capturing()": torch.cuda.is_current_stream_capturing,
        "to_device(numpy 1,100 int64): the pinned ring": lambda: to_device(array, dev),
        f"to_device(list of {rows}, int64)": lambda: to_device(values, dev, torch.int64),
        "device slice dst[:n]": lambda: dst[:rows],
        f"dst[:n].copy_(src) (device to device, n={rows})": lambda: dst[:rows].copy_(src),
        "trivial Triton launch": lambda: _touch[(1,)](one),
        f"gumbel_sample {rows} x 151,936 (two launches)": lambda: gumbel_sample(
            logits, None, None, inv_temperature=inv, states=states, advance=3
        ),
        "CUDA graph replay, 1 kernel": g1.replay,
        "CUDA graph replay, 300 kernels": g300.replay,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {}
    cases = cpu_cases(args.rows)
    sync = None
    if torch.cuda.is_available():
        cases |= cuda_cases(args.rows)
        sync = torch.cuda.synchronize
    for name, fn in cases.items():
        calls = args.calls if "replay" not in name and "gumbel" not in name else args.calls // 4
        results[name] = round(timed(fn, calls, sync=sync), 2)
        print(f"{name:<52} {results[name]:9.2f} µs")
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": args.rows, "us_per_call": results}, f, indent=1)


if __name__ == "__main__":
    main()
