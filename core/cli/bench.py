"""`pegboard bench offline ...` — throughput benchmarks; JSON results for docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    off = kinds.add_parser("offline", help="nano-vllm-style offline throughput")
    off.add_argument("--num-seqs", type=int, default=256)
    off.add_argument("--min-input", type=int, default=100)
    off.add_argument("--max-input", type=int, default=1024)
    off.add_argument("--min-output", type=int, default=100)
    off.add_argument("--max-output", type=int, default=1024)
    off.add_argument("--workload-seed", type=int, default=0)
    off.add_argument("--random-weights", action="store_true", help="random weights from --config")
    off.add_argument("--config", default=None, help="bundled real config (with --random-weights)")
    off.add_argument("--json", default=None, metavar="FILE", help="write the result here too")
    add_engine_arguments(off)
    off.set_defaults(func=run_offline_cmd)


def _device_name(llm) -> str:
    import torch

    device = llm.engine.runner.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def run_offline_cmd(args: argparse.Namespace) -> int:
    from pegboard.core.bench.models import config_model_dir
    from pegboard.core.bench.offline import OfflineWorkload, run_offline
    from pegboard.core.llm import LLM

    settings = engine_settings(args)
    if args.random_weights:
        if not args.config:
            print("pegboard bench: --random-weights needs --config NAME", file=sys.stderr)
            return 2
        try:
            settings["model"] = str(config_model_dir(args.config))
        except ValueError as e:
            print(f"pegboard bench: {e}", file=sys.stderr)
            return 2
        settings["load_format"] = "dummy"
    workload = OfflineWorkload(
        num_seqs=args.num_seqs,
        min_input=args.min_input,
        max_input=args.max_input,
        min_output=args.min_output,
        max_output=args.max_output,
        seed=args.workload_seed,
    )
    with LLM(**settings) as llm:
        result = run_offline(llm, workload)
        result["device"] = _device_name(llm)
        result["model"] = args.config if args.random_weights else str(llm.engine.model_dir)
        result["plugins"] = {
            slot: llm.engine.plugins.active(slot).name
            for slot in ("scheduler", "kv_cache", "attention", "sampler")
        }
    result["command"] = "pegboard " + " ".join(sys.argv[1:])
    result["date"] = datetime.date.today().isoformat()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
