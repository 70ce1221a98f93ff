"""Engine flags shared by `pegboard generate`, `serve` and `bench`: model, dtype, budgets, KV
sizing, plugin selections and each plugin's options (generated from their option models)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pegboard.core.config import EngineConfig


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from pegboard.core.options import add_plugin_arguments
    from pegboard.core.plugin_manager import PluginManager

    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="local HF model directory (default: bundled SmolLM2-135M-Instruct)",
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights (benchmarks of a config without its checkpoint)",
    )
    g.add_argument(
        "--quantization",
        default=None,
        choices=["gptq", "awq", "compressed-tensors", "gguf"],
        help="weight quantization (default: config.json's quantization_config); gguf serves the "
        "model's GGUF file (the bundled SmolLM2's 4-bit Q4_1) natively, docs/quantization.md",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8_e4m3"],
        help="KV cache storage: auto (the model's dtype) or fp8_e4m3 (half the bytes, per-layer "
        "scales; attention backends triton and torch)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="tokens per step: the chunked-prefill budget (default 8192)",
    )
    g.add_argument("--max-running-requests", type=int, default=256)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run decode steps eagerly, without CUDA graphs",
    )
    g.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=None,
        help="largest decode batch replayed as a CUDA graph (default 256; larger batches run eagerly)",
    )
    g.add_argument(
        "--disable-overlap",
        action="store_true",
        help="run each step's CPU work (schedule, allocate, prepare) only after the GPU finished "
        "the previous step (ablation of overlap scheduling)",
    )
    g.add_argument(
        "--disable-fused-kernels",
        action="store_true",
        help="use plain PyTorch ops instead of the fused Triton kernels (RMSNorm + residual, "
        "SiLU-and-mul, rotary) on CUDA",
    )
    add_distributed_arguments(p)
    g.add_argument("--patch", action="append", default=[], dest="patches", metavar="NAME")
    g.add_argument("--strict-patches", action="store_true")
    add_plugin_arguments(p, PluginManager())


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism and multi-node (docs/architecture.md)")
    g.add_argument(
        "--tp-size",
        "--tensor-parallel-size",
        type=int,
        default=1,
        dest="tp_size",
        help="tensor-parallel ranks, one process (and GPU) each (default 1)",
    )
    g.add_argument("--nnodes", type=int, default=1, help="nodes the ranks span (default 1)")
    g.add_argument(
        "--node-rank", type=int, default=0, help="this node's index, 0 serves HTTP (default 0)"
    )
    g.add_argument(
        "--dist-init-addr",
        metavar="HOST:PORT",
        help="rank 0's rendezvous address, the same on every node (default: a free local port)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a collective waits for a lost rank before the group fails (default 600)",
    )


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields (and plugin options) the parsed flags set."""
    from pegboard.core.options import collect_plugin_options
    from pegboard.core.patches import patches_from_env
    from pegboard.core.plugin_manager import PluginManager

    fields = set(EngineConfig.model_fields) - {"plugin_options", "patches"}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings["patches"] = list(args.patches) + patches_from_env()
    settings["plugin_options"] = collect_plugin_options(args, PluginManager())
    if os.environ.get("PEGBOARD_MODEL") and not settings.get("model"):
        settings["model"] = os.environ["PEGBOARD_MODEL"]
    return settings
