"""Attention micro-benchmark on a CUDA GPU: the `triton` and `flashinfer` backends against the
reference `torch` backend, per layer call (`forward` after one `prepare`), on paged decode and
prefill batches. The flashinfer backend is set up as the engine does for CUDA graphs
(`prepare_for_capture`), and is skipped with the reason when it cannot run.

Reports ms per call (eager, and replayed from a CUDA graph, which leaves out Python launch
costs), KV bytes read per second for decode, TFLOP/s for prefill, and the largest difference
from the torch backend. `--sweep` also times the decode and extend kernels over block sizes,
split counts, warps and pipeline stages. Run on the lent machine after
`bash scripts/device-run.sh` installed pegboard:

    python3 scripts/bench_attention.py [--sweep] [--json FILE] [--backends triton,flashinfer,torch]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time

import torch
from pegboard.plugins.kernels import triton_attention
from pegboard.plugins.kernels.attention_flashinfer import FlashInferAttentionBackend
from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DEVICE = torch.device("cuda")
CASES = {
    "decode 64 x 1024": ([1023] * 64, [1] * 64),
    "decode 256 x 512": ([511] * 256, [1] * 256),
    "decode 1 x 8192": ([8191], [1]),
    "prefill 8 x 1024": ([0] * 8, [1024] * 8),
    "extend 4 x 512 over 1536 cached": ([1536] * 4, [512] * 4),
}


def make_step(cached: list[int], new: list[int]) -> tuple[ModelInfo, KVPool, ForwardBatch, tuple]:
    """A one-layer pool with random KV, scattered pages, and the step's batch and q/k/v."""
    dev = DEVICE
    info = ModelInfo("Bench", 1, HEADS, KV_HEADS, HEAD_DIM, 4096, 1000, 32768, DTYPE, dev)
    pages_per = [-(-(c + n) // PAGE_SIZE) for c, n in zip(cached, new)]
    pool = KVPool.allocate(info, sum(pages_per), PAGE_SIZE)
    pool.k[0].normal_()
    pool.v[0].normal_()
    order = torch.randperm(sum(pages_per)).tolist()
    tables, slots = [], []
    for c, n, p in zip(cached, new, pages_per):
        table, order = order[:p], order[p:]
        tables.append(table)
        slots += [table[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(c, c + n)]
    tokens = sum(new)
    batch = ForwardBatch(
        requests=[Request([1] * (c + n)) for c, n in zip(cached, new)],
        input_ids=torch.zeros(tokens, dtype=torch.int64, device=dev),
        positions=torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)]).to(dev),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        query_lens_cpu=list(new),
        seq_lens_cpu=[c + n for c, n in zip(cached, new)],
        page_tables_cpu=tables,
        logits_indices=torch.tensor(new, device=dev).cumsum(0) - 1,
        samples=[True] * len(new),
    )
    q = torch.randn(tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=dev)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev)
    return info, pool, batch, (q, k, v)


def time_ms(fn, iters: int = 50) -> float:
    """Mean ms per call over `iters` back-to-back calls (after warm-up), by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn, iters: int = 50) -> float | None:
    """ms per replay of `fn` captured in a CUDA graph; None when capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, iters)
    except RuntimeError as err:
        print(f"    graph capture failed: {str(err).splitlines()[0]}")
        return None


def kv_bytes(seq_lens: list[int]) -> int:
    return sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * torch.tensor([], dtype=DTYPE).element_size()


def flops(cached: list[int], new: list[int]) -> int:
    """Multiply-adds x 2 of QK^T and PV under the causal mask."""
    keys = sum(n * c + n * (n + 1) // 2 for c, n in zip(cached, new))
    return 4 * keys * HEADS * HEAD_DIM


def make_backend(label: str, info: ModelInfo, pool: KVPool, requests: int):
    """The backend `label` names: triton, torch, flashinfer (tensor-core decode chosen by the
    group size), flashinfer-tc / flashinfer-cc (tensor-core / CUDA-core decode forced)."""
    if label == "triton":
        return TritonAttentionBackend(info, pool)
    if label == "torch":
        return TorchAttentionBackend(info, pool)
    cores = {"flashinfer": "auto", "flashinfer-tc": "on", "flashinfer-cc": "off"}[label]
    backend = FlashInferAttentionBackend(info, pool, decode_tensor_cores=cores, jit=False)
    backend.prepare_for_capture(requests)
    return backend


def bench_case(name: str, cached: list[int], new: list[int], labels: list[str]) -> dict:
    info, pool, batch, (q, k, v) = make_step(cached, new)
    row: dict = {"case": name, "requests": len(new), "new_tokens": sum(new)}
    outs = {}
    for label in labels:
        try:
            backend = make_backend(label, info, pool, len(new))
        except (ImportError, RuntimeError) as err:
            print(f"    {label} skipped: {err}")
            continue
        backend.prepare(batch)
        outs[label] = backend.forward(0, q, k, v).float()
        row[f"{label}_ms"] = time_ms(lambda b=backend: b.forward(0, q, k, v))
        row[f"{label}_graph_ms"] = graph_ms(lambda b=backend: b.forward(0, q, k, v))
        start = time.perf_counter()
        for _ in range(20):
            backend.prepare(batch)
        torch.cuda.synchronize()
        row[f"{label}_prepare_ms"] = (time.perf_counter() - start) * 1000 / 20
        if label == "triton" and batch.is_decode_only:
            row["triton_splits"] = backend.num_splits
        best = min(t for t in (row[f"{label}_ms"], row[f"{label}_graph_ms"]) if t is not None)
        if batch.is_decode_only:
            row[f"{label}_kv_gb_s"] = kv_bytes(batch.seq_lens_cpu) / best / 1e6
        else:
            row[f"{label}_tflop_s"] = flops(cached, new) / best / 1e9
    for label in outs:
        if label != "torch" and "torch" in outs:
            row[f"{label}_max_abs_diff"] = (outs[label] - outs["torch"]).abs().max().item()
    print(json.dumps(row))
    return row


def sweep_decode(name: str, cached: list[int], new: list[int]) -> list[dict]:
    info, pool, batch, (q, k, v) = make_step(cached, new)
    backend = TritonAttentionBackend(info, pool)
    backend.prepare(batch)
    out = torch.empty_like(q)
    rows = []
    configs = [(64, 4, 2), (64, 4, 3), (32, 4, 2), (32, 2, 3), (128, 4, 2), (128, 8, 2), (64, 8, 3)]
    for splits, (block_n, warps, stages) in itertools.product([1, 2, 4, 8], configs):
        workspace = triton_attention.decode_workspace(len(new), HEADS, splits, HEAD_DIM, q.device)

        def call(s=splits, n=block_n, w=warps, st=stages, ws=workspace):
            return triton_attention.decode_attention(
                q, pool.k[0], pool.v[0], backend.page_table, backend.seq_lens, backend.scale,
                out, num_splits=s, workspace=ws, block_n=n, num_warps=w, num_stages=st,
            )  # fmt: skip

        try:
            ms = graph_ms(call)
        except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
            print(f"    decode {splits} {block_n} {warps} {stages}: {type(err).__name__}")
            continue
        if ms is None:
            continue
        row = {"case": name, "splits": splits, "block_n": block_n, "warps": warps}
        row |= {"stages": stages, "ms": ms, "kv_gb_s": kv_bytes(batch.seq_lens_cpu) / ms / 1e6}
        rows.append(row)
    rows.sort(key=lambda r: r["ms"])
    for row in rows[:5]:
        print("  decode sweep", json.dumps(row))
    return rows


def sweep_extend(name: str, cached: list[int], new: list[int]) -> list[dict]:
    info, pool, batch, (q, k, v) = make_step(cached, new)
    backend = TritonAttentionBackend(info, pool)
    out = torch.empty_like(q)
    rows = []
    configs = [(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3)]
    configs += [(64, 128, 8, 2), (128, 128, 8, 2), (64, 32, 4, 3)]
    for block_m, block_n, warps, stages in configs:
        backend.tokens_per_block = triton_attention.tokens_per_block(backend.group, block_m)
        backend.prepare(batch)

        def call(m=block_m, n=block_n, w=warps, st=stages, b=backend):
            return triton_attention.extend_attention(
                q, pool.k[0], pool.v[0], b.page_table, b.prefix_lens, b.query_starts,
                b.block_map, b.num_blocks, b.scale, out, block_m=m, block_n=n, num_warps=w,
                num_stages=st,
            )  # fmt: skip

        try:
            ms = graph_ms(call)
        except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
            print(f"    extend {block_m} {block_n} {warps} {stages}: {type(err).__name__}")
            continue
        if ms is None:
            continue
        row = {"case": name, "block_m": block_m, "block_n": block_n, "warps": warps}
        row |= {"stages": stages, "ms": ms, "tflop_s": flops(cached, new) / ms / 1e9}
        rows.append(row)
    rows.sort(key=lambda r: r["ms"])
    for row in rows[:5]:
        print("  extend sweep", json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configurations")
    parser.add_argument("--json", metavar="FILE", help="write all results here")
    parser.add_argument(
        "--backends",
        default="triton,flashinfer,torch",
        help="comma-separated: triton, torch, flashinfer, flashinfer-tc, flashinfer-cc",
    )
    args = parser.parse_args()
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
        "page_size": PAGE_SIZE,
        "dtype": str(DTYPE),
        "cases": [
            bench_case(name, *shape, args.backends.split(",")) for name, shape in CASES.items()
        ],
    }
    if args.sweep:
        result["decode_sweep"] = sweep_decode("decode 64 x 1024", *CASES["decode 64 x 1024"])
        result["decode_sweep_bs1"] = sweep_decode("decode 1 x 8192", *CASES["decode 1 x 8192"])
        result["extend_sweep"] = sweep_extend("prefill 8 x 1024", *CASES["prefill 8 x 1024"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
