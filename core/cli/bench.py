"""`pegboard bench offline|prefix ...` — benchmarks with JSON results for docs/benchmarks.md.

Both take the engine flags, and `--random-weights --config NAME` to build a model from a
bundled real config with random weights on the device."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from typing import Any

from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pegboard.core.bench.prefix import add_workload_arguments

    p = sub.add_parser("bench", help="run a benchmark")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    off = kinds.add_parser("offline", help="nano-vllm-style offline throughput")
    off.add_argument("--num-seqs", type=int, default=256)
    off.add_argument("--min-input", type=int, default=100)
    off.add_argument("--max-input", type=int, default=1024)
    off.add_argument("--min-output", type=int, default=100)
    off.add_argument("--max-output", type=int, default=1024)
    off.add_argument("--workload-seed", type=int, default=0)
    _add_common(off)
    off.set_defaults(func=run_offline_cmd)
    prefix = kinds.add_parser("prefix", help="shared-prefix workload: hit rate and throughput")
    add_workload_arguments(prefix)
    _add_common(prefix)
    prefix.set_defaults(func=run_prefix_cmd)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", action="store_true", help="random weights from --config")
    p.add_argument("--config", default=None, help="bundled real config (with --random-weights)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result here too")
    add_engine_arguments(p)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Engine settings from the flags; raises ValueError for a bad --random-weights use."""
    from pegboard.core.bench.models import config_model_dir

    settings = engine_settings(args)
    if args.random_weights:
        if not args.config:
            raise ValueError("--random-weights needs --config NAME")
        settings["model"] = str(config_model_dir(args.config))
        settings["load_format"] = "dummy"
    return settings


def _device_name(llm) -> str:
    import torch

    device = llm.engine.runner.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _run(args: argparse.Namespace, bench) -> int:
    """Build the LLM from the flags, run `bench(llm)`, print and save the result."""
    from pegboard.core.llm import LLM

    try:
        settings = _settings(args)
    except ValueError as e:
        print(f"pegboard bench: {e}", file=sys.stderr)
        return 2
    with LLM(**settings) as llm:
        facts = {
            "device": _device_name(llm),
            "model": args.config if args.random_weights else str(llm.engine.model_dir),
            "plugins": {
                slot: llm.engine.plugins.active(slot).name
                for slot in ("scheduler", "kv_cache", "attention", "sampler")
            },
        }
        result = bench(llm) | facts
    result["command"] = "pegboard " + " ".join(sys.argv[1:])
    result["date"] = datetime.date.today().isoformat()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


def run_offline_cmd(args: argparse.Namespace) -> int:
    from pegboard.core.bench.offline import OfflineWorkload, run_offline

    workload = OfflineWorkload(
        num_seqs=args.num_seqs,
        min_input=args.min_input,
        max_input=args.max_input,
        min_output=args.min_output,
        max_output=args.max_output,
        seed=args.workload_seed,
    )
    return _run(args, lambda llm: run_offline(llm, workload))


def run_prefix_cmd(args: argparse.Namespace) -> int:
    from pegboard.core.bench.prefix import run_prefix_bench, workload_from_args

    workload = workload_from_args(args)
    return _run(args, lambda llm: run_prefix_bench(lambda: llm, workload, progress=True))
