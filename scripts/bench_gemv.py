"""GEMV kernels (`pegboard.core.kernels.gemv`) against cuBLAS (`F.linear`), bf16 on a CUDA GPU.

For every linear layer of the Llama-3.1-8B and Qwen3-0.6B configs (fused qkv, o, fused
gate/up, down, LM head) and 1, 2, 4, 8 rows of x:

- `--sweep`: time cuBLAS and each candidate launch configuration, check each candidate's
  output against a float32 reference, and print the fastest per shape as a `DECODE_CONFIGS`
  table (None where cuBLAS wins);
- without it: time cuBLAS and the configuration `DECODE_CONFIGS` holds (what the model runs).

`--configs` takes bundled config names; `NAME-eagle3` (e.g. `smollm2-135m-eagle3`) the two
shapes of an EAGLE-3 head for NAME that NAME itself lacks (`--no-step` with it).

Times are medians over replays of one CUDA graph of many calls (launch gaps as in a decode
graph), cycling through copies of the weight that together exceed the L2 cache twice, so
every call streams its weight from device memory as a decode step does; TB/s counts the
weight bytes. Then `step`: all linear layers of one decode step at 1, 2, 4, 8 rows (distinct
weights per layer, as in the model), cuBLAS alone vs with the GEMV kernels where
`DECODE_CONFIGS` has them, with and without programmatic dependent launch.
`--e2e` times Llama-3.1-8B batch-1 decode with and without the GEMV and PDL
(`scripts/profile_decode.py`, `--disable-gemv`). Run on the lent machine after
`bash scripts/device-run.sh setup`:

    python3 scripts/bench_gemv.py [--sweep] [--e2e] [--json FILE] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import e2e_decode  # scripts/e2e_decode.py (this script's folder is on sys.path)
import torch
import triton
from pegboard.core.bench.models import config_model_dir
from pegboard.core.kernels import gemv as gemv_module
from pegboard.core.kernels.gemv import GemvConfig, gemv
from pegboard.core.models.config import ModelConfig
from torch.nn import functional as F

CONFIGS = ("llama-3.1-8b", "qwen3-0.6b")
ROWS = (1, 2, 4, 8)
DTYPE, DEVICE = torch.bfloat16, torch.device("cuda")
ROTATE_BYTES = 2 * 50 * 2**20 * 2  # twice the H100's 50 MiB L2, and some
E2E = [sys.executable, "scripts/profile_decode.py", "--config", "llama-3.1-8b"]
E2E += ["--tokens", "128", "--no-profile", "--cuda-graph-max-bs", "8"]


@dataclass
class Shape:
    config: str
    layer: str
    n: int
    k: int

    @property
    def weight_bytes(self) -> int:
        return self.n * self.k * 2


@dataclass
class Timing:
    config: str
    layer: str
    n: int
    k: int
    rows: int
    cublas_us: float
    gemv_us: float | None  # the chosen (or table) configuration; None: none ran
    gemv_config: dict | None
    error: float | None  # chosen configuration vs the float32 reference
    candidates: list[dict] = field(default_factory=list)  # --sweep: every candidate's result


def shapes(config: str, tp: int = 1) -> list[Shape]:
    """The linear layers of `config`, as one rank of `tp` holds them (column-parallel qkv,
    gate_up and LM head split their outputs, row-parallel o and down their inputs; KV heads
    replicated where there are fewer than `tp`). `NAME-eagle3`: the layers an EAGLE-3 head
    for NAME has beside NAME's own shapes (its o, gate_up and down are NAME's): its qkv over
    `[embedding, feature]` (2 x hidden) and its fc over three target layers (3 x hidden)."""
    if config.endswith("-eagle3"):
        cfg = ModelConfig.from_dir(config_model_dir(config.removesuffix("-eagle3")))
        h, d = cfg.hidden_size, cfg.head_dim
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        return [Shape(config, "qkv", qkv, 2 * h), Shape(config, "fc", h, 3 * h)]
    cfg = ModelConfig.from_dir(config_model_dir(config))
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d // tp, max(cfg.num_kv_heads // tp, 1) * d
    inter = cfg.intermediate_size // tp
    name = config if tp == 1 else f"{config} tp{tp}"
    return [
        Shape(name, "qkv", q + 2 * kv, h),
        Shape(name, "o", h, q),
        Shape(name, "gate_up", 2 * inter, h),
        Shape(name, "down", h, inter),
        Shape(name, "lm_head", -(-cfg.vocab_size // tp), h),
    ]


def candidates(rows: int) -> list[GemvConfig]:
    """Launch configurations to try for `rows` rows of x (before split-K variants)."""
    dot = [
        GemvConfig(16, 256, dot=True, num_stages=3),
        GemvConfig(16, 512, dot=True, num_stages=3),
        GemvConfig(32, 256, dot=True, num_stages=4),
        GemvConfig(64, 128, dot=True, num_stages=4),
    ]
    if rows == 1:
        return [
            GemvConfig(2, 2048),
            GemvConfig(4, 1024),
            GemvConfig(4, 2048),
            GemvConfig(8, 1024),
            GemvConfig(8, 512),
            GemvConfig(8, 2048, num_warps=8),
            GemvConfig(16, 1024, num_warps=8),
            GemvConfig(4, 4096, num_warps=8),
            dot[2],
        ]
    if rows == 2:
        gemvs = [GemvConfig(2, 2048), GemvConfig(4, 1024), GemvConfig(4, 2048, num_warps=8)]
        gemvs.append(GemvConfig(8, 1024, num_warps=8))
    elif rows == 4:
        gemvs = [GemvConfig(1, 2048), GemvConfig(2, 1024), GemvConfig(4, 1024, num_warps=8)]
    else:
        gemvs = [GemvConfig(1, 1024), GemvConfig(2, 1024, num_warps=8)]
    return gemvs + dot


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    err = (out.float() - reference).norm() / reference.norm()
    return float("inf") if not torch.isfinite(err) else err.item()


def graph_us(calls: list[Callable[[], object]], replays: int = 15) -> float:
    """Median µs per call over replays of one CUDA graph of `calls`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / len(calls)


class Bench:
    """One shape's rotating weight copies and the timings over them."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        copies = min(64, max(2, math.ceil(ROTATE_BYTES / shape.weight_bytes)))
        self.weights = [
            torch.randn(shape.n, shape.k, device=DEVICE, dtype=DTYPE) for _ in range(copies)
        ]
        self.reps = max(1, math.ceil(2 * ROTATE_BYTES / (copies * shape.weight_bytes)))

    def time(self, x: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], object]) -> float:
        calls = [lambda w=w: op(x, w) for w in self.weights] * self.reps
        return graph_us(calls)

    def check(self, x: torch.Tensor, config: GemvConfig) -> float:
        w = self.weights[0]
        torch.full((x.shape[0], self.shape.n), float("nan"), dtype=DTYPE, device=DEVICE)
        out = gemv(x, w, None, config)  # lands in the freed NaN block
        return relative_error(out, F.linear(x.float(), w.float()))


def sweep_one(bench: Bench, rows: int, deadline: float) -> Timing:
    """cuBLAS and every candidate (then split-K variants of the two best) at `rows` rows."""
    s = bench.shape
    x = torch.randn(rows, s.k, device=DEVICE, dtype=DTYPE)
    cublas = bench.time(x, F.linear)
    results: list[tuple[float, GemvConfig, float]] = []

    def run(config: GemvConfig) -> None:
        if time.monotonic() > deadline:
            return
        try:
            error = bench.check(x, config)
            us = bench.time(x, lambda x, w: gemv(x, w, None, config))
        except Exception as e:  # a configuration that fails to compile or launch is skipped
            print(f"  {s.layer} {rows} {config}: {type(e).__name__}: {str(e)[:120]}")
            return
        results.append((us, config, error))

    for config in candidates(rows):
        run(config)
    # Split K where the best two leave fewer than 4 programs per multiprocessor.
    few = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    best_two = sorted((r for r in results if r[2] < 1e-2), key=lambda r: r[0])[:2]
    for _, config, _ in best_two:
        if triton.cdiv(s.n, config.block_n) < few:
            for split in (2, 4):
                run(GemvConfig(**{**asdict(config), "split_k": split}))
    valid = sorted((r for r in results if r[2] < 1e-2), key=lambda r: r[0])
    best = valid[0] if valid else None
    return Timing(
        s.config,
        s.layer,
        s.n,
        s.k,
        rows,
        cublas,
        best[0] if best else None,
        asdict(best[1]) if best else None,
        best[2] if best else None,
        [{"us": us, "error": err, **asdict(c)} for us, c, err in results],
    )


def table_one(bench: Bench, rows: int) -> Timing:
    """cuBLAS and the `DECODE_CONFIGS` entry at `rows` rows (if any)."""
    s = bench.shape
    x = torch.randn(rows, s.k, device=DEVICE, dtype=DTYPE)
    cublas = bench.time(x, F.linear)
    config = gemv_module.decode_config(rows, bench.weights[0])
    if config is None:
        return Timing(s.config, s.layer, s.n, s.k, rows, cublas, None, None, None)
    error = bench.check(x, config)
    us = bench.time(x, lambda x, w: gemv(x, w, None, config))
    return Timing(s.config, s.layer, s.n, s.k, rows, cublas, us, asdict(config), error)


def chosen(t: Timing) -> GemvConfig | None:
    """The configuration to use: the GEMV's if it ran faster than cuBLAS."""
    if t.gemv_config is None or t.gemv_us is None or t.gemv_us >= t.cublas_us:
        return None
    return GemvConfig(**t.gemv_config)


STEP_VARIANTS: dict[str, Callable[[GemvConfig], GemvConfig]] = {
    "gemv": lambda c: c,  # as DECODE_CONFIGS says
    "gemv_dot_no_pdl": lambda c: replace(c, pdl=False) if c.dot else c,
    "gemv_no_pdl": lambda c: replace(c, pdl=False),
}


def decode_step(config: str, rows: int) -> dict[str, float]:
    """GPU ms of every linear layer of one decode step (distinct weights per layer, one graph):
    cuBLAS alone, and with the GEMV where `DECODE_CONFIGS` has it, also without PDL for the
    tensor-core kernel or for all."""
    cfg = ModelConfig.from_dir(config_model_dir(config))
    layer_shapes = shapes(config)  # four per layer, then the LM head
    weights = [
        torch.empty(s.n, s.k, device=DEVICE, dtype=DTYPE).normal_()
        for s in layer_shapes[:4] * cfg.num_layers + layer_shapes[4:]
    ]
    inputs = {s.k: torch.randn(rows, s.k, device=DEVICE, dtype=DTYPE) for s in layer_shapes}
    total_bytes = sum(w.numel() * 2 for w in weights)

    def call(w: torch.Tensor, variant: str | None) -> Callable[[], object]:
        x = inputs[w.shape[1]]
        config = gemv_module.decode_config(rows, w) if variant else None
        if config is None:
            return lambda: F.linear(x, w)
        config = STEP_VARIANTS[variant](config)
        return lambda: gemv(x, w, None, config)

    out = {}
    for variant in (None, *STEP_VARIANTS):
        per_call = graph_us([call(w, variant) for w in weights], replays=10)
        ms = per_call * len(weights) / 1e3
        out[f"{variant or 'cublas'}_ms"] = ms
        out[f"{variant or 'cublas'}_tb_s"] = total_bytes / ms / 1e9
    del weights
    torch.cuda.empty_cache()
    return out


def copy_tb_s() -> float:
    """Device-to-device copy rate (bytes read plus written) of a 1 GiB tensor."""
    a = torch.empty(2**29, device=DEVICE, dtype=DTYPE).normal_()
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 20)
    return 2 * a.numel() * 2 / us / 1e6


E2E_VARIANTS = {  # name: (extra flags, extra environment); the two that matter most first
    "gemv": ([], {}),
    "no-gemv-no-pdl": (["--disable-gemv"], {"PEGBOARD_DISABLE_PDL": "1"}),
    "gemv-no-pdl": ([], {"PEGBOARD_DISABLE_PDL": "1"}),
    "no-gemv": (["--disable-gemv"], {}),
}


def run_e2e(log_dir: Path | None) -> dict[str, float | None]:
    """Llama-3.1-8B batch-1 ms/token with and without the GEMV and PDL, each in its own
    process."""
    return e2e_decode.run_e2e(E2E, E2E_VARIANTS, log_dir, timeout=120, tail=200)


def environment() -> dict[str, str]:
    """The device and versions a benchmark ran on, and the date (for its JSON)."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def format_table(timings: list[Timing]) -> str:
    """`DECODE_CONFIGS` entries for the measured shapes (None where cuBLAS was faster)."""
    lines = []
    by_shape: dict[tuple[int, int], list[Timing]] = {}
    for t in timings:
        by_shape.setdefault((t.n, t.k), []).append(t)
    for (n, k), ts in by_shape.items():
        lines.append(f"    (torch.bfloat16, {n}, {k}): {{  # {ts[0].config} {ts[0].layer}")
        for t in ts:
            c = chosen(t)
            gemv_us = f"{t.gemv_us:.1f}" if t.gemv_us is not None else "-"
            note = f"  # cuBLAS {t.cublas_us:.1f} us, GEMV {gemv_us} us"
            lines.append(f"        {t.rows}: {c!r},{note}")
        lines.append("    },")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="try every candidate configuration")
    p.add_argument("--e2e", action="store_true", help="also time Llama-3.1-8B batch-1 decode")
    p.add_argument("--no-step", action="store_true", help="skip the whole-step timing")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--log-dir", type=Path, help="write the e2e runs' logs here")
    p.add_argument("--budget-s", type=float, default=240, help="stop sweeping after this")
    p.add_argument("--configs", default=",".join(CONFIGS), help="model configs (comma-separated)")
    p.add_argument("--tp", type=int, default=1, help="the shapes one rank of this TP size holds")
    p.add_argument(
        "--rows", default=",".join(map(str, ROWS)), help="rows of x to time (comma-separated)"
    )
    args = p.parse_args()
    deadline = time.monotonic() + args.budget_s
    torch.manual_seed(0)
    timings: list[Timing] = []
    with torch.inference_mode():
        for config in args.configs.split(","):
            for shape in shapes(config, args.tp):
                bench = Bench(shape)
                for rows in map(int, args.rows.split(",")):
                    t = sweep_one(bench, rows, deadline) if args.sweep else table_one(bench, rows)
                    timings.append(t)
                    print(
                        f"{t.config} {t.layer} {t.n}x{t.k} rows {rows}: cuBLAS {t.cublas_us:.1f}"
                        f" us, GEMV {t.gemv_us} us {t.gemv_config} err {t.error}",
                        flush=True,
                    )
                del bench
                torch.cuda.empty_cache()
        copy = copy_tb_s()  # after the shapes: the GPU is at its clocks by now
        steps = {}
        if not args.no_step:
            for config in CONFIGS:
                for rows in ROWS:
                    steps[f"{config} rows {rows}"] = decode_step(config, rows)
                    print(
                        f"step {config} rows {rows}: {steps[f'{config} rows {rows}']}", flush=True
                    )
    e2e = run_e2e(args.log_dir) if args.e2e else {}
    if args.json:
        payload = {
            **environment(),
            "copy_tb_s": copy,
            "sweep": args.sweep,
            "timings": [asdict(t) for t in timings],
            "decode_step": steps,
            "e2e_ms_per_token": e2e,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    if args.sweep:
        print("\nDECODE_CONFIGS = {\n" + format_table(timings) + "\n}")
    print_table(timings, steps, e2e, copy)


def print_table(
    timings: list[Timing], steps: dict[str, dict[str, float]], e2e: dict, copy: float
) -> None:
    print(f"\n{torch.cuda.get_device_name()}, bf16, µs per call (graph replays, weights cold)")
    print(f"device copy {copy:.2f} TB/s; TB/s below = weight bytes / time")
    print(
        f"{'shape':<22}{'rows':>4} {'cuBLAS us':>10} {'TB/s':>5} {'GEMV us':>8} {'TB/s':>5} {'x':>5}"
    )
    for t in timings:
        weight = t.n * t.k * 2
        g = (
            f"{t.gemv_us:>8.1f} {weight / t.gemv_us / 1e6:>5.2f}"
            if t.gemv_us
            else f"{'-':>8} {'-':>5}"
        )
        x = f"{t.cublas_us / t.gemv_us:>5.2f}" if t.gemv_us else f"{'-':>5}"
        name = f"{t.config[:5]} {t.layer} {t.n}x{t.k}"
        print(
            f"{name:<22}{t.rows:>4} {t.cublas_us:>10.1f} {weight / t.cublas_us / 1e6:>5.2f} {g} {x}"
        )
    for name, s in steps.items():
        print(
            f"step {name}: cuBLAS {s['cublas_ms']:.3f} ms ({s['cublas_tb_s']:.2f} TB/s), "
            f"GEMV {s['gemv_ms']:.3f} ({s['gemv_tb_s']:.2f} TB/s); without PDL: tensor-core "
            f"kernel {s['gemv_dot_no_pdl_ms']:.3f}, all {s['gemv_no_pdl_ms']:.3f}"
        )
    for name, ms in e2e.items():
        tok_s = f"{1e3 / ms:.1f} tok/s" if ms else "-"
        print(f"e2e Llama-3.1-8B batch 1, {name}: {ms} ms/token ({tok_s})")


if __name__ == "__main__":
    main()
