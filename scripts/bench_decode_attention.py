"""The paged decode attention kernel's launch variants (`DECODE_VARIANTS`) on a CUDA GPU.

Per shape, KV cache dtype and variant: µs per layer call, effective bandwidth (the KV bytes
the call must read / time) and the largest difference from a float32 torch reference. Shapes:

- `nano`: the nano-vllm workload's decode batch with Qwen3-0.6B's heads (16 query / 8 KV,
  head size 128): 256 requests of a prompt of 100-1024 tokens plus 1-100 generated ones;
- `llama-1x4096`, `llama-1x384`: Llama-3.1-8B (32 / 8 heads) at batch 1;
- `llama-64x2048`: Llama-3.1-8B, 64 requests of 2048 tokens;
- `qwen-64x640`: Qwen3-0.6B's heads, 64 requests of 640 tokens (`spec-eagle-batch64` halfway);
- `nano-tail`: the nano-vllm batch after 600 decode steps (the 112 requests still running,
  each at its prompt plus 600 tokens).

Page size 16. The pages are scattered at random over a pool `--pool-factor` times larger than
the batch needs, as in a pool that has served a while. Each timed call reads a different
"layer" (its own pages), enough of them that one replay reads more than `--min-mb` (the L2
cache holds 50 MB on an H200), and the calls are replayed from one CUDA graph (no launch
gaps). The split count is the engine's for a CUDA graph (`choose_num_splits` with the
model's context limit, `--splits-for graph`) or for an eager step (the batch's longest
request, `--splits-for actual`).

    python3 scripts/bench_decode_attention.py [--variants baseline,s3] [--cases nano]
        [--dtypes bf16,fp8] [--json FILE]
    python3 scripts/bench_decode_attention.py --sweep [--budget-s 150] [--json FILE]

`--sweep` times every variant, shape by shape in the order above (nano first), until the
budget is spent, and ends with a table (µs; `*` marks each column's fastest) and the
`DECODE_DEFAULTS` line that picks the fastest per batch size.

FlashInfer's paged decode over the same pool and pages, for comparison (`--variants
...,flashinfer-cc,flashinfer-tc`; with an FP8 pool its e4m3 kernels): `flashinfer-cc` its
CUDA-core decode kernel (what the `flashinfer` backend runs for GQA groups below 4),
`flashinfer-tc` its tensor-core (FA2 prefill) kernel; wrappers in CUDA-graph mode as the
backend plans them, kernels from `PEGBOARD_FLASHINFER_KERNELS` (`pegboard kernels build`).

The `fp8_mma` variants (`mma8-*`, e4m3 tensor-core dots, `decode_fp8mma.py`) read a copy of the
FP8 values stored transposed per page, as a pool with `--kv-cache-layout hdp` holds them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_gemv import graph_us as gemv_graph_us  # scripts/bench_gemv.py (same folder)
from pegboard.plugins.kernels.triton_attention import decode_configs
from pegboard.plugins.kernels.triton_attention.decode import (
    choose_num_splits,
    decode_attention,
    decode_workspace,
)
from pegboard.sdk.types import transpose_values

DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
#: FlashInfer's decode kernels, by name: whether the wrapper uses tensor cores.
FLASHINFER_VARIANTS = {"flashinfer-cc": False, "flashinfer-tc": True}
PAGE_SIZE, HEAD_DIM = 16, 128
#: Largest difference from the float32 reference a variant may have (bf16 outputs of O(1)).
MAX_ERR = 5e-2
#: The `fp8_mma` variants quantize the query and the probabilities to e4m3 as well (their
#: tests' bound: tests/test_decode_fp8mma.py).
MAX_ERR_E4M3_DOTS = 0.12


@dataclass
class Case:
    heads: int
    kv_heads: int
    seq_lens: list[int]
    max_model_len: int  # the model's context limit: a CUDA graph's split count comes from it


ORDERED = "+order"  # `--ordered`: a variant's name with its programs launched longest first


def nano_lens(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(100, 1024) + rng.randint(1, 100) for _ in range(256)]


def nano_tail_lens(step: int = 600, seed: int = 0) -> list[int]:
    """The nano-vllm workload's decode batch late in the run: the requests whose output
    (100-1,024 tokens) is longer than `step`, each at its prompt (100-1,024) plus `step`."""
    rng = random.Random(seed)
    pairs = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    return [prompt + step for prompt, out in pairs if out > step]


CASES = {
    "nano": Case(16, 8, nano_lens(), 40960),
    "llama-1x4096": Case(32, 8, [4096], 131072),
    "llama-64x2048": Case(32, 8, [2048] * 64, 131072),
    "llama-1x384": Case(32, 8, [384], 131072),
    # (issue 17, session 21: at batch 64 the decode kernel read its KV at ~2.9 TB/s in the
    # engine, against ~4.2 at the nano batch; much of the nano workload runs at such batches)
    "qwen-64x640": Case(16, 8, [640] * 64, 40960),
    "nano-tail": Case(16, 8, nano_tail_lens(), 40960),
}


class Setup:
    """One shape and KV dtype on the GPU: `layers` page tables into one shared pool (pages
    scattered over it), q, the output and the float32 reference of layer 0."""

    def __init__(self, case: Case, kv_dtype: torch.dtype, pool_factor: float, min_mb: float):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.case, self.kv_dtype = case, kv_dtype
        lens = case.seq_lens
        pages_per = [-(-n // PAGE_SIZE) for n in lens]
        self.kv_bytes = sum(lens) * case.kv_heads * HEAD_DIM * 2 * kv_dtype.itemsize
        self.layers = max(1, min(64, -(-int(min_mb * 2**20) // self.kv_bytes)))
        need = sum(pages_per) * self.layers
        num_pages = int(need * pool_factor) + 1
        shape = (num_pages, PAGE_SIZE, case.kv_heads, HEAD_DIM)
        self.k = torch.randn(shape, device=dev).to(kv_dtype)
        self.v = torch.randn(shape, device=dev).to(kv_dtype)
        # The `fp8_mma` variants read values stored transposed per page (`--kv-cache-layout
        # hdp`), the same values: a copy in that layout
        self.v_hdp = transpose_values(self.v) if kv_dtype.itemsize == 1 else None
        order = torch.randperm(num_pages, device=dev)[:need].int()
        self.tables, at = [], 0
        for _ in range(self.layers):
            table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32, device=dev)
            for i, n in enumerate(pages_per):
                table[i, :n] = order[at : at + n]
                at += n
            self.tables.append(table)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        # bf16 queries as the models have (float16 in the interpreter, whose bf16 dots are wrong)
        q_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
        self.q = torch.randn(len(lens), case.heads, HEAD_DIM, device=dev).to(q_dtype)
        self.outs = [torch.empty_like(self.q) for _ in range(self.layers)]
        self.scale = HEAD_DIM**-0.5
        self.reference = self._reference()

    def _reference(self) -> torch.Tensor:
        case, table = self.case, self.tables[0]
        group = case.heads // case.kv_heads
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device)
        for i, n in enumerate(case.seq_lens):
            pages = table[i, : -(-n // PAGE_SIZE)].long()
            k = self.k[pages].float().reshape(-1, case.kv_heads, HEAD_DIM)[:n]
            v = self.v[pages].float().reshape(-1, case.kv_heads, HEAD_DIM)[:n]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            logits = torch.einsum("hd,nhd->hn", self.q[i].float(), k) * self.scale
            out[i] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v)
        return out

    def calls(self, config: decode_configs.DecodeConfig, splits: int, ordered: bool = False):
        # (`--ordered`: the engine sorts once per step, for all its layers: not timed here)
        order = torch.argsort(self.seq_lens, descending=True) if ordered else None
        work = None
        if splits > 1:
            work = decode_workspace(len(self.case.seq_lens), self.case.heads, splits, HEAD_DIM,
                                    self.q.device)  # fmt: skip
        args = (self.k, self.v_hdp if config.fp8_mma and self.v_hdp is not None else self.v)
        return [
            lambda t=t, o=o: decode_attention(
                self.q,
                *args,
                t,
                self.seq_lens,
                self.scale,
                o,
                splits,
                work,
                config=config,
                order=order,
            )
            for t, o in zip(self.tables, self.outs)
        ]


def flashinfer_calls(setup: Setup, tensor_cores: bool) -> list:
    """One call per layer of FlashInfer's paged decode over the setup's pool and page tables:
    a wrapper in CUDA-graph mode per layer (its own index buffers), planned once."""
    import flashinfer
    from pegboard.plugins.kernels import flashinfer_kernels

    kernel_dir = os.environ.get(flashinfer_kernels.KERNEL_DIR_ENV)
    if kernel_dir:
        flashinfer_kernels.use_kernel_dir(kernel_dir)
    case, dev = setup.case, setup.q.device
    pages_per = [-(-n // PAGE_SIZE) for n in case.seq_lens]
    indptr = torch.tensor([0, *itertools.accumulate(pages_per)], dtype=torch.int32)
    last = [n - (p - 1) * PAGE_SIZE for n, p in zip(case.seq_lens, pages_per)]
    last = torch.tensor(last, dtype=torch.int32)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)  # runs one at a time
    calls = []
    for table, out in zip(setup.tables, setup.outs):
        indices = torch.cat([table[i, :p] for i, p in enumerate(pages_per)])
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=torch.empty_like(indptr, device=dev),
            paged_kv_indices_buffer=torch.empty_like(indices),
            paged_kv_last_page_len_buffer=torch.empty_like(last, device=dev),
            backend="fa2",
        )
        wrapper.plan(
            indptr, indices, last, case.heads, case.kv_heads, HEAD_DIM, PAGE_SIZE,
            sm_scale=setup.scale, q_data_type=setup.q.dtype, kv_data_type=setup.kv_dtype,
        )  # fmt: skip
        calls.append(lambda w=wrapper, o=out: w.run(setup.q, (setup.k, setup.v), out=o))
    return calls


def graph_us(calls, replays: int) -> float:
    """Median µs per call over replays of one CUDA graph of `calls` (repeated to at least 20,
    so the graph's launch hides behind its kernels)."""
    if not torch.cuda.is_available():  # --smoke: the interpreter, wall time of one call
        start = time.perf_counter()
        calls[0]()
        return (time.perf_counter() - start) * 1e6
    return gemv_graph_us(calls * -(-20 // len(calls)), replays)


def measure(setup: Setup, name: str, splits_for: str, replays: int) -> dict:
    case = setup.case
    dev = setup.q.device
    base, ordered = name.removesuffix(ORDERED), name.endswith(ORDERED)
    if name in FLASHINFER_VARIANTS:
        config, splits = None, 0  # (FlashInfer splits in its plan)
    else:
        config = decode_configs.DECODE_VARIANTS[base]
        length = case.max_model_len if splits_for == "graph" else max(case.seq_lens)
        splits = choose_num_splits(len(case.seq_lens), case.kv_heads, length, dev, config=config)
        splits = min(splits, choose_num_splits(1, case.kv_heads, length, dev))  # engine's cap
    row = {"variant": name, "splits": splits}
    try:
        if config is None:
            calls = flashinfer_calls(setup, FLASHINFER_VARIANTS[name])
        else:
            calls = setup.calls(config, splits, ordered)
        calls[0]()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        row["max_err"] = float((setup.outs[0].float() - setup.reference).abs().max())
        limit = MAX_ERR_E4M3_DOTS if config is not None and config.fp8_mma else MAX_ERR
        if not row["max_err"] <= limit:  # (NaN too) a wrong variant is never the fastest
            row["error"] = f"wrong: max error {row['max_err']:.3g} > {limit}"
            return row
        us = graph_us(calls, replays)
    except Exception as err:  # noqa: BLE001 - a variant that does not compile is a result
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    row["us"] = round(us, 2)
    row["tb_s"] = round(setup.kv_bytes / us / 1e6, 3)
    return row


def suggest_defaults(results: list[dict]) -> str | None:
    """The `DECODE_DEFAULTS` line that runs the fastest bf16 variant of the nano shape for
    batches of 32 requests and more, and the fastest of Llama batch 1 at 4096 below that (a
    shape not timed keeps the current choice)."""

    def best(key):
        rows = [r for r in results if r["key"] == key and "us" in r
                and r["variant"] in decode_configs.DECODE_VARIANTS]  # fmt: skip
        return min(rows, key=lambda r: r["us"])["variant"] if rows else None

    large, small = best("nano bf16"), best("llama-1x4096 bf16")
    if not large and not small:
        return None
    current = dict((fewest, name) for fewest, name in decode_configs.DECODE_DEFAULTS)
    large = large or current.get(32, "baseline")  # (not timed here: the line's as it is)
    small = small or current.get(0, "baseline")
    return f'DECODE_DEFAULTS: tuple[tuple[int, str], ...] = ((32, "{large}"), (0, "{small}"))'


def table(results: list[dict]) -> str:
    keys = list(dict.fromkeys(r["key"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    cell = {(r["key"], r["variant"]): r for r in results}
    fastest = {}
    for key in keys:
        timed = [r for r in results if r["key"] == key and "us" in r]
        if timed:
            fastest[key] = min(timed, key=lambda r: r["us"])["variant"]
    width = max(len(v) for v in variants) + 2
    lines = ["µs per layer call (splits); * fastest in its column", " " * width
             + "".join(f"{k:>22s}" for k in keys)]  # fmt: skip
    for v in variants:
        parts = []
        for key in keys:
            r = cell.get((key, v))
            if r is None:
                parts.append(f"{'-':>22s}")
            elif "us" not in r:
                parts.append(f"{r['error'].split(':')[0][:20]:>22s}")
            else:
                mark = "*" if fastest.get(key) == v else " "
                parts.append(f"{r['us']:>14.1f} ({r['splits']:>2d}){mark:<2s}")
        lines.append(f"{v:<{width}s}" + "".join(parts))
    for key in keys:
        if key in fastest:
            r = cell[(key, fastest[key])]
            base = cell.get((key, "baseline"), {})
            gain = f", {base['us'] / r['us']:.2f}x baseline" if "us" in base else ""
            lines.append(f"fastest {key}: {fastest[key]} {r['us']:.1f} µs "
                         f"{r['tb_s']:.2f} TB/s{gain}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="every variant, within --budget-s")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--variants", default=None, help="comma-separated names (default: all with "
                   "--sweep, else baseline and the engine's defaults)")  # fmt: skip
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--splits-for", choices=["graph", "actual"], default="graph")
    p.add_argument("--pool-factor", type=float, default=4.0)
    p.add_argument("--min-mb", type=float, default=512.0)
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--ordered", action="store_true", help="also time each variant launched "
                   "longest request first (`decode.launch_order`), as NAME+order")  # fmt: skip
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter "
                   "(TRITON_INTERPRET=1): checks this script, times nothing meaningful")  # fmt: skip
    args = p.parse_args()
    if args.smoke:  # 4 requests of 1/16 the lengths, one layer of KV
        for case in CASES.values():
            case.seq_lens = [max(1, n // 16) for n in case.seq_lens[:4]]
        args.min_mb, args.replays = 0.1, 1
    if args.variants:
        names = args.variants.split(",")
    elif args.sweep:
        names = list(decode_configs.DECODE_VARIANTS)
    else:
        names = list(dict.fromkeys(["baseline", *(n for _, n in decode_configs.DECODE_DEFAULTS)]))
    known = [*decode_configs.DECODE_VARIANTS, *FLASHINFER_VARIANTS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {known}")
    if args.ordered:  # each variant then its ordered twin (FlashInfer plans its own order)
        twins = {n: [n] if n in FLASHINFER_VARIANTS else [n, n + ORDERED] for n in names}
        names = [m for n in names for m in twins[n]]
    import triton

    began, results, skipped = time.monotonic(), [], []
    for case_name in args.cases.split(","):
        for dtype_name in args.dtypes.split(","):
            key = f"{case_name} {dtype_name}"
            if time.monotonic() - began > args.budget_s:
                skipped.append(key)
                continue
            setup = Setup(CASES[case_name], DTYPES[dtype_name], args.pool_factor, args.min_mb)
            print(f"== {key}: {len(setup.case.seq_lens)} requests, "
                  f"{setup.kv_bytes / 1e6:.1f} MB of KV per call, {setup.layers} layers",
                  flush=True)  # fmt: skip
            for name in names:
                config = decode_configs.DECODE_VARIANTS.get(name.removesuffix(ORDERED))
                if (
                    dtype_name != "fp8"
                    and config is not None
                    and (config.f16_dot or config.fp8_mma)
                ):
                    continue  # float16 / e4m3 dots are for FP8 caches: the same kernel as without
                if time.monotonic() - began > args.budget_s:
                    skipped.append(f"{key} {name}")
                    continue
                row = {"key": key, **measure(setup, name, args.splits_for, args.replays)}
                results.append(row)
                if "us" in row:
                    print(f"  {name:24s} splits {row['splits']:2d}  {row['us']:9.2f} µs  "
                          f"{row['tb_s']:6.3f} TB/s  max err {row['max_err']:.2e}", flush=True)  # fmt: skip
                else:
                    print(f"  {name:24s} {row['error']}", flush=True)
            del setup
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print()
    print(table(results))
    if skipped:
        print(f"not run (budget {args.budget_s:.0f} s): {len(skipped)}, first: {skipped[0]}")
    line = suggest_defaults(results)
    if line:
        print(f"decode_configs.py, the fastest per batch size:\n  {line}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "splits_for": args.splits_for,
            "defaults": decode_configs.DECODE_DEFAULTS,
            "results": results,
            "skipped": skipped,
            "suggested_defaults": line,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
