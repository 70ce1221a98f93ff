"""Host time of a decode step's layout (`ModelRunner.prepare`) and the Triton backend's
`prepare`, with the steady decode step (`pegboard.core.steady_decode`) on and off.

python3 scripts/bench_steady_decode.py [--requests 256] [--page-size 16] [--steps 200]
                                       [--finish-every 0] [--device cpu|cuda]

Builds `--requests` synthetic requests (contexts of 100-1,000 tokens, a page table each),
then runs `--steps` decode steps: each request one token further (a new page when it crosses
a page boundary; with `--finish-every N`, one request leaves every N steps), the model runner
laying the step out and the backend preparing its metadata. No model runs. The same steps
run with the steady step on and off (`SteadyDecode.follow` answering None), alternating
`--rounds` times in one process; prints the median thread-CPU µs per step of each part, the
best round's. On CPU the backend's device tensors are CPU tensors (Triton's interpreter mode:
no kernel runs); on `--device cuda` the uploads and launches are real (wall clock matters
there too: see `pegboard bench offline --profile-host`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--finish-every", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["PEGBOARD_STEADY_DECODE"] = "1"  # "rebuilt" turns it off by patching `follow`
    from pegboard.core import steady_decode

    follow = steady_decode.SteadyDecode.follow
    results: dict[str, list[dict[str, float]]] = {"steady": [], "rebuilt": []}
    for _ in range(args.rounds):
        for mode in results:
            steady_decode.SteadyDecode.follow = follow if mode == "steady" else _never
            results[mode].append(run(args))
    steady_decode.SteadyDecode.follow = follow
    best = {
        mode: min(rounds, key=lambda r: r["total"]) for mode, rounds in results.items()
    }  # fmt: skip
    print(json.dumps({"us_per_step_median": best, "settings": vars(args)}, indent=1))


def _never(self, *args):
    return None


def run(args) -> dict[str, float]:
    from pegboard.core.model_runner import ModelRunner
    from pegboard.core.page_tables import PageTableMirror
    from pegboard.core.steady_decode import SteadyDecode
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend
    from pegboard.sdk.types import KVPool, ModelInfo, Request

    device, ps = torch.device(args.device), args.page_size
    info = ModelInfo(
        architecture="Qwen3ForCausalLM", num_layers=1, num_heads=16, num_kv_heads=8,
        head_dim=128, hidden_size=1024, vocab_size=151936, max_model_len=4096,
        dtype=torch.bfloat16, device=device,
    )  # fmt: skip
    backend = TritonAttentionBackend(info, KVPool(k=[], v=[], page_size=ps), max_requests=512)
    backend.prepare_for_capture(512)  # as with CUDA graphs: fixed tensors
    runner = ModelRunner.__new__(ModelRunner)  # the layout only: no model
    runner.device, runner.page_tables, runner.steady = (
        device,
        PageTableMirror(),
        SteadyDecode(device),
    )
    rng = random.Random(0)
    free = iter(range(10**7))
    requests = []
    for _ in range(args.requests):
        n = rng.randint(100, 1000)
        r = Request(list(range(n)))
        r.num_computed_tokens = n - 1
        r.page_table = [next(free) for _ in range(-(-n // ps))]
        requests.append(r)
    parts = {"prepare": [], "attention.prepare": []}
    for step in range(args.steps):
        if args.finish_every and step % args.finish_every == 0 and len(requests) > 1:
            requests.pop(rng.randrange(len(requests)))
        start = time.thread_time()
        batch = runner.prepare(requests, [1] * len(requests), ps)
        mid = time.thread_time()
        backend.prepare(batch)
        end = time.thread_time()
        parts["prepare"].append(mid - start)
        parts["attention.prepare"].append(end - mid)
        for r in requests:  # the step ran: one token further, a page when one is needed
            r.num_computed_tokens += 1
            r.token_ids.append(7)
            if len(r.page_table) * ps < len(r.token_ids):
                r.page_table.append(next(free))
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in parts.items()}
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


if __name__ == "__main__":
    main()
