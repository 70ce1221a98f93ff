"""Fused kernels (`pegboard.core.kernels`) against the model's PyTorch ops, bf16 on a CUDA GPU.

For the Llama-3.1-8B and Qwen3-0.6B configs, at decode (1, 64, 256 rows) and prefill (2048
rows) shapes, each kernel's output is compared with the PyTorch op's (relative error: largest
absolute difference over the largest absolute value), and both with a float32 reference of
the same bf16 inputs; then both are timed (median ms, `triton.testing`): replayed from a CUDA
graph (GPU time alone, as decode steps run) and eagerly (with launch costs). `--e2e` then
times batch-1 decode of the whole Llama-3.1-8B model with and without the fused kernels
(`scripts/profile_decode.py`). Run on the lent machine after `bash scripts/device-run.sh`:

    python3 scripts/bench_fused.py [--e2e] [--json FILE] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import e2e_decode  # scripts/e2e_decode.py (this script's folder is on sys.path)
import torch
import triton
from pegboard.core.bench.models import config_model_dir
from pegboard.core.kernels.activation import silu_and_mul
from pegboard.core.kernels.norm import rms_norm
from pegboard.core.kernels.rotary import rotary_embedding
from pegboard.core.models.config import ModelConfig
from pegboard.core.models.layers import RMSNorm
from pegboard.core.models.layers import silu_and_mul as torch_silu_and_mul
from pegboard.core.models.rope import RotaryEmbedding
from triton.testing import do_bench, do_bench_cudagraph

CONFIGS = ("llama-3.1-8b", "qwen3-0.6b")
ROWS = (1, 64, 256, 2048)
DTYPE, DEVICE = torch.bfloat16, torch.device("cuda")
E2E = [
    sys.executable,
    "scripts/profile_decode.py",
    "--config",
    "llama-3.1-8b",
    "--tokens",
    "128",
    "--attention",
    "triton",
    "--no-profile",
]


@dataclass
class Row:
    config: str
    kernel: str
    rows: int
    err_vs_torch: float  # fused against the bf16 PyTorch op
    err_torch_fp32: float  # the PyTorch op against the float32 reference
    err_fused_fp32: float  # the fused kernel against the float32 reference
    torch_graph_ms: float
    fused_graph_ms: float
    torch_eager_ms: float
    fused_eager_ms: float


@dataclass
class Case:
    """One kernel at one shape: the PyTorch op, the fused kernel (both runnable repeatedly),
    and their outputs next to the float32 reference for the error check."""

    kernel: str
    torch_op: Callable[[], object]
    fused_op: Callable[[], object]
    outputs: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def make_norm(size: int, eps: float, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(size, eps).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(size, device=DEVICE, generator=_gen(7)))
    return norm.to(dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, generator=_gen(seed)).to(DTYPE)


def cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.float().flatten() for t in tensors])


def norm_cases(cfg: ModelConfig, rows: int) -> list[Case]:
    norm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, DTYPE)
    norm32 = copy.deepcopy(norm).float()
    x, residual = randn(rows, cfg.hidden_size), randn(rows, cfg.hidden_size, seed=1)
    w, eps = norm.weight, norm.eps

    def add_outputs():
        normed, new_residual = rms_norm(x, w, eps, residual)
        t_normed, t_residual = norm(x, residual)
        s = x.float() + residual.float()
        return cat(normed, new_residual), cat(t_normed, t_residual), cat(norm32(s), s)

    return [
        Case(
            "rms_norm",
            lambda: norm(x),
            lambda: rms_norm(x, w, eps),
            lambda: (rms_norm(x, w, eps), norm(x), norm32(x.float())),
        ),
        Case(
            "add_rms_norm",
            lambda: norm(x, residual),
            lambda: rms_norm(x, w, eps, residual),
            add_outputs,
        ),
    ]


def silu_case(cfg: ModelConfig, rows: int) -> Case:
    gate_up = randn(rows, 2 * cfg.intermediate_size, seed=2)
    return Case(
        "silu_and_mul",
        lambda: torch_silu_and_mul(gate_up),
        lambda: silu_and_mul(gate_up),
        lambda: (
            silu_and_mul(gate_up),
            torch_silu_and_mul(gate_up),
            torch_silu_and_mul(gate_up.float()),
        ),
    )


def rope_case(cfg: ModelConfig, rows: int) -> Case:
    """Rope on the q/k views of a qkv output; with Qwen3's q/k norm fused in."""
    d, hq, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    rotary = RotaryEmbedding(cfg.rope, d, 4096).to(DEVICE)
    qkv = randn(rows, (hq + 2 * hk) * d, seed=3)
    positions = torch.randint(0, 4096, (rows,), device=DEVICE, generator=_gen(4))

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = t.split([hq * d, hk * d, hk * d], dim=-1)
        return q.view(rows, hq, d), k.view(rows, hk, d)

    q, k = views(qkv)
    scratch = qkv.clone()  # the fused kernel rotates in place
    sq, sk = views(scratch)
    if cfg.qk_norm:
        qn = make_norm(d, cfg.rms_norm_eps, DTYPE)
        kn = make_norm(d, cfg.rms_norm_eps, DTYPE)
        n32 = copy.deepcopy(qn).float()  # q and k weights are the same values here
        weights = (qn.weight, kn.weight, qn.eps)
        kernel = "qk_norm_rope"

        def torch_op():
            return rotary(positions, qn(q), kn(k))

        def reference():
            return rotary(positions, n32(q.float()), n32(k.float()))
    else:
        weights = ()
        kernel = "rope"

        def torch_op():
            return rotary(positions, q, k)

        def reference():
            return rotary(positions, q.float(), k.float())

    def fused_op():
        rotary_embedding(positions, sq, sk, rotary.cos, rotary.sin, *weights)

    def outputs():
        fresh = qkv.clone()
        fq, fk = views(fresh)
        rotary_embedding(positions, fq, fk, rotary.cos, rotary.sin, *weights)
        return cat(fq, fk), cat(*torch_op()), cat(*reference())

    return Case(kernel, torch_op, fused_op, outputs)


def measure(config: str, cfg: ModelConfig, rows: int, case: Case) -> Row:
    fused, plain, reference = case.outputs()
    return Row(
        config=config,
        kernel=case.kernel,
        rows=rows,
        err_vs_torch=relative_error(fused, plain),
        err_torch_fp32=relative_error(plain, reference),
        err_fused_fp32=relative_error(fused, reference),
        torch_graph_ms=do_bench_cudagraph(case.torch_op, rep=20, return_mode="median"),
        fused_graph_ms=do_bench_cudagraph(case.fused_op, rep=20, return_mode="median"),
        torch_eager_ms=do_bench(case.torch_op, warmup=5, rep=25, return_mode="median"),
        fused_eager_ms=do_bench(case.fused_op, warmup=5, rep=25, return_mode="median"),
    )


def decode_step_estimate(rows: list[Row], config: str, cfg: ModelConfig) -> tuple[float, float]:
    """GPU ms of these ops in one batch-1 decode step (graph times): per layer two add+norms,
    rope and SiLU-and-mul, plus the final add+norm; PyTorch vs fused."""
    per = {r.kernel: r for r in rows if r.config == config and r.rows == 1}
    rope = per.get("qk_norm_rope") or per["rope"]
    layer = [per["add_rms_norm"], per["add_rms_norm"], rope, per["silu_and_mul"]]
    n = cfg.num_layers
    torch_ms = n * sum(r.torch_graph_ms for r in layer) + per["add_rms_norm"].torch_graph_ms
    fused_ms = n * sum(r.fused_graph_ms for r in layer) + per["add_rms_norm"].fused_graph_ms
    return torch_ms, fused_ms


def run_e2e(log_dir: Path | None) -> dict[str, float | None]:
    """Llama-3.1-8B batch-1 ms/token, fused and unfused, each in its own process."""
    variants = {"fused": ([], {}), "unfused": (["--disable-fused-kernels"], {})}
    return e2e_decode.run_e2e(E2E, variants, log_dir, timeout=200, tail=300)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--e2e", action="store_true", help="also time Llama-3.1-8B batch-1 decode")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--log-dir", type=Path, help="write the e2e runs' logs here")
    args = p.parse_args()
    torch.manual_seed(0)
    results: list[Row] = []
    estimates = {}
    with torch.inference_mode():
        for config in CONFIGS:
            cfg = ModelConfig.from_dir(config_model_dir(config))
            for rows in ROWS:
                for case in [*norm_cases(cfg, rows), silu_case(cfg, rows), rope_case(cfg, rows)]:
                    results.append(measure(config, cfg, rows, case))
            estimates[config] = decode_step_estimate(results, config, cfg)
    torch.cuda.empty_cache()  # leave the GPU to the e2e runs
    e2e = run_e2e(args.log_dir) if args.e2e else {}
    if args.json:
        facts = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
        payload = {
            **facts,
            "kernels": [asdict(r) for r in results],
            "decode_step_ms": estimates,
            "e2e_ms_per_token": e2e,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    print_table(results, estimates, e2e)


def print_table(
    results: list[Row], estimates: dict[str, tuple[float, float]], e2e: dict[str, float | None]
) -> None:
    print(f"\n{torch.cuda.get_device_name()}, bf16, median ms (graph replay | eager)")
    print(
        f"{'config':<13}{'kernel':<14}{'rows':>5} {'err/torch':>9} {'err/fp32':>17}"
        f" {'torch graph':>11} {'fused graph':>11} {'x':>5} {'torch eager':>11} {'fused eager':>11}"
    )
    for r in results:
        print(
            f"{r.config:<13}{r.kernel:<14}{r.rows:>5} {r.err_vs_torch:>9.1e}"
            f" {r.err_torch_fp32:>8.1e}|{r.err_fused_fp32:<8.1e}"
            f" {r.torch_graph_ms:>11.4f} {r.fused_graph_ms:>11.4f}"
            f" {r.torch_graph_ms / r.fused_graph_ms:>5.2f} {r.torch_eager_ms:>11.4f}"
            f" {r.fused_eager_ms:>11.4f}"
        )
    for config, (torch_ms, fused_ms) in estimates.items():
        print(
            f"{config} batch-1 step, these ops (graph): torch {torch_ms:.3f} ms, fused {fused_ms:.3f} ms"
        )
    if e2e:
        print(
            f"Llama-3.1-8B batch-1 decode, triton attention, graphs: fused {e2e['fused']} ms/token, unfused {e2e['unfused']} ms/token"
        )


if __name__ == "__main__":
    main()
