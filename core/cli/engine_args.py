"""Engine flags shared by `pegboard generate`, `serve` and `bench`: model, dtype, budgets, KV
sizing, plugin selections and each plugin's options (generated from their option models).

vLLM's and SGLang's names for the same settings are accepted as aliases (`--max-num-seqs`,
`--enable-prefix-caching`, `--context-length`, ...); their flags pegboard has no counterpart
for fail with a hint (`FLAG_HINTS`: one entry per flag, deleted when pegboard gains it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pegboard.core.config import EngineConfig
from pegboard.core.moe.flags import add_moe_arguments, moe_settings
from pegboard.core.speculative.flags import add_speculative_arguments, speculative_settings


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from pegboard.core.options import add_plugin_arguments
    from pegboard.core.plugin_manager import PluginManager

    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="local HF model directory (default: bundled SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations (default auto: the checkpoint's dtype on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default auto: CUDA if present)"
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="auto: the checkpoint's weights; dummy: random weights (benchmarks of a config "
        "without its checkpoint) (default auto)",
    )
    g.add_argument(
        "--seed",
        "--random-seed",
        type=int,
        default=None,
        help="the engine's random seed, which plugins (the sampler) seed from (default 0)",
    )
    g.add_argument(
        "--chat-template",
        metavar="FILE",
        default=None,
        help="a Jinja chat template file replacing the tokenizer's (default: the tokenizer's)",
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
        "scales; attention backends triton, flashinfer and torch) (default auto)",
    )
    g.add_argument(
        "--kv-cache-layout",
        default="auto",
        choices=["auto", "nhd", "hdp"],
        help="how an FP8 pool stores values: nhd (like the keys) or hdp (transposed per page, "
        "for the triton backend's e4m3 tensor-core decode; attention backends triton and torch, "
        "no speculation); auto: hdp for FP8 on CUDA with triton and no speculation, else nhd "
        "(default auto; docs/kernels.md)",
    )
    g.add_argument(
        "--kv-cache-scales",
        metavar="FILE",
        default=None,
        help='per-layer FP8 KV scales, JSON {"k_scales": [...], "v_scales": [...]} (e.g. '
        "calibrated by scripts/bench_kv_fp8.py --write-scales); default: the checkpoint's, else 1.0",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        "--chunked-prefill-size",
        type=int,
        default=8192,
        help="tokens per step: the chunked-prefill budget (default 8192)",
    )
    g.add_argument(
        "--max-running-requests",
        "--max-num-seqs",
        type=int,
        default=256,
        help="requests in one batch at most (default 256)",
    )
    g.add_argument(
        "--max-model-len",
        "--context-length",
        type=int,
        default=None,
        help="context length served, prompt plus output (default: the model's)",
    )
    g.add_argument(
        "--page-size", type=int, default=16, help="tokens per KV cache page (default 16)"
    )
    g.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="KV cache size in tokens (default: sized from free memory on CUDA, "
        "512 MiB worth on CPU); must hold one --max-model-len request",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        "--mem-fraction-static",
        type=float,
        default=0.85,
        help="share of the GPU's memory pegboard may use for weights, activations and KV "
        "(default 0.85)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        dest="kv_cache",
        action="store_const",
        const="radix",
        default=None,
        help="vLLM's name for --kv-cache radix",
    )
    g.add_argument(
        "--disable-cuda-graph",
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly, without CUDA graphs (decode and mixed)",
    )
    g.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=None,
        help="largest decode batch replayed as a CUDA graph (default 256; larger batches run eagerly)",
    )
    g.add_argument(
        "--cuda-graph-mixed-max-tokens",
        type=int,
        default=None,
        help="largest mixed step (prefill tokens beside decodes) replayed as a CUDA graph, in "
        "tokens (default 8192, capped at --max-num-batched-tokens; 0: mixed steps run eagerly)",
    )
    g.add_argument(
        "--disable-overlap",
        action="store_true",
        help="run each step's CPU work (schedule, allocate, prepare) only after the GPU finished "
        "the previous step (ablation of overlap scheduling)",
    )
    g.add_argument(
        "--detokenizer",
        choices=("auto", "inline", "thread", "process"),
        default=None,
        help="where text, stop strings and streaming are done: after each step on the step "
        "loop's thread (inline), on a thread of their own, or in a process of their own fed "
        "token ids (SGLang's detokenizer layout: out of the step loop's GIL); auto (the "
        "default): process on a CUDA device, inline on the CPU",
    )
    g.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="once the model is loaded, the KV pool allocated and the CUDA graphs captured, "
        "move the heap to the garbage collector's permanent generation (gc.freeze, as vLLM and "
        "SGLang do), so no full collection walks it inside the step loop (default on)",
    )
    g.add_argument(
        "--disable-fused-kernels",
        action="store_true",
        help="use plain PyTorch ops instead of the fused Triton kernels (RMSNorm + residual, "
        "SiLU-and-mul, rotary) on CUDA",
    )
    add_distributed_arguments(p)
    add_speculative_arguments(p)  # SGLang's --speculative-* flags (core/speculative/flags.py)
    add_moe_arguments(p)  # --ep-size, --enable-eplb, ... (core/moe/flags.py)
    g.add_argument(
        "--patch",
        action="append",
        default=[],
        dest="patches",
        metavar="NAME",
        help="apply this version-gated patch (repeatable; also PEGBOARD_PATCHES=a,b) (default: none)",
    )
    g.add_argument(
        "--strict-patches",
        action="store_true",
        help="a patch gated out by its version requirements is an error, not a logged skip",
    )
    for flag, hint in FLAG_HINTS.items():
        g.add_argument(flag, nargs="?", action=FlagHint, hint=hint, help=argparse.SUPPRESS)
    add_plugin_arguments(p, PluginManager())


#: Flags of vLLM / SGLang that pegboard has no counterpart for, and what to use instead. Each
#: entry fails with its hint; delete an entry when pegboard gains the flag.
FLAG_HINTS = {
    "--pipeline-parallel-size": "pegboard has no pipeline parallelism; use --tp-size",
    "--trust-remote-code": "pegboard runs its own model code (docs/architecture.md); drop the flag",
    "--tokenizer": "pegboard reads the tokenizer from --model's directory; put it there",
    "--speculative-config": "use --speculative-algorithm NGRAM|STANDALONE (or --speculator)",
}


class FlagHint(argparse.Action):
    """A flag pegboard does not have: exit 2 with a hint naming what to use instead."""

    def __init__(self, *args: Any, hint: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not a pegboard flag: {self.hint}")


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
    speculative_settings(args, settings)  # --speculative-algorithm NGRAM -> speculator ngram
    moe_settings(args, settings)  # --enable-eplb -> expert_placement eplb
    if os.environ.get("PEGBOARD_MODEL") and not settings.get("model"):
        settings["model"] = os.environ["PEGBOARD_MODEL"]
    return settings


def read_chat_template(args: argparse.Namespace) -> str | None:
    """The text of `--chat-template FILE`, or None; ValueError if it cannot be read."""
    path = getattr(args, "chat_template", None)
    if not path:
        return None
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--chat-template {path}: {e.strerror or e}") from e


def use_chat_template(tokenizer: Any, template: str | None) -> None:
    """Replace `tokenizer`'s chat template by `template` (when given)."""
    if template is not None:
        tokenizer.hf.chat_template = template
