"""`pegboard bench offline|prefix|serve ...` — benchmarks with JSON results for docs/benchmarks.md.

offline and prefix take the engine flags, and `--random-weights --config NAME` to build a model
from a bundled real config with random weights on the device; offline can run the same
workload through a peer engine afterwards (`--peer transformers`). serve loads a running
`pegboard serve` (or any OpenAI-compatible server on this machine) over HTTP, or, with
`--random-weights --config NAME`, starts one with random weights of that config and stops it
afterwards. offline and serve draw a chart of the result with `--chart FILE.png`."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import math
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pegboard.core.bench.peer import PEERS
    from pegboard.core.bench.prefix import add_workload_arguments

    p = sub.add_parser("bench", help="run a benchmark")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    from pegboard.core.bench.models import bundled_configs

    off = kinds.add_parser(
        "offline",
        help="nano-vllm-style offline throughput",
        description="Offline throughput on the nano-vllm workload: --num-seqs requests with "
        "random token-id prompts and output lengths drawn uniformly from the --min/--max "
        "ranges, EOS ignored; reports output tok/s, and the plugin layer's share of step time. "
        "Bundled configs for --random-weights --config NAME: "
        f"{', '.join(bundled_configs())}.",
    )
    off.add_argument("--num-seqs", type=int, default=256)
    off.add_argument("--min-input", type=int, default=100)
    off.add_argument("--max-input", type=int, default=1024)
    off.add_argument("--min-output", type=int, default=100)
    off.add_argument("--max-output", type=int, default=1024)
    off.add_argument("--workload-seed", type=int, default=0)
    off.add_argument("--max-token-id", type=int, default=10000, help="random prompt ids up to")
    off.add_argument(
        "--peer",
        choices=PEERS,
        default=None,
        help="then run the same workload through this engine on the same device "
        "(continuous batching; `generate` for one sequence)",
    )
    off.add_argument(
        "--peer-timeout", type=float, default=600.0, metavar="S", help="bound on the peer's run"
    )
    off.add_argument("--chart", default=None, metavar="FILE.png", help="bars of output tok/s")
    off.add_argument(
        "--profile-host",
        action="store_true",
        help="also time the host's phases per step (schedule, prepare, forward launch, "
        "resolve, wait for the device, ...): `host_profile` in the result",
    )
    off.add_argument(
        "--torch-profile",
        default=None,
        metavar="DIR",
        help="also record a few steps of the timed run with the torch profiler: "
        "DIR/kernels.txt (kernels by device time) and DIR/trace.json (Chrome trace)",
    )
    off.add_argument(
        "--torch-profile-steps",
        default="40,8",
        metavar="SKIP,COUNT",
        help="which steps --torch-profile records: COUNT steps after the first SKIP "
        "(default 40,8: steady decode; 0,20: the opening prefill steps)",
    )
    _add_common(off)
    off.set_defaults(func=run_offline_cmd)
    prefix = kinds.add_parser("prefix", help="shared-prefix workload: hit rate and throughput")
    add_workload_arguments(prefix)
    _add_common(prefix)
    prefix.set_defaults(func=run_prefix_cmd)
    _add_serve_parser(kinds)


def _add_serve_parser(kinds: argparse._SubParsersAction) -> None:
    s = kinds.add_parser(
        "serve",
        help="latency and throughput of a running server (streamed /v1/completions)",
        description="Load a server on this machine with streamed /v1/completions requests "
        "(ignore_eos, per-request max_tokens) and report TTFT, TPOT, ITL and e2e percentiles, "
        "requests/s and tok/s.",
    )
    s.add_argument("--url", default="http://127.0.0.1:8000", help="loopback server address")
    s.add_argument("--model", default=None, help="model name to send (default: the server's)")
    s.add_argument("--num-prompts", type=int, default=64)
    load = s.add_argument_group("load (default: every request at once)")
    load.add_argument("--concurrency", type=int, default=None, help="at most C in flight")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals, R per second"
    )
    s.add_argument("--min-input", type=int, default=100)
    s.add_argument("--max-input", type=int, default=1024)
    s.add_argument("--min-output", type=int, default=100)
    s.add_argument("--max-output", type=int, default=1024)
    src = s.add_mutually_exclusive_group()
    src.add_argument("--random-ids", action="store_true", help="random token-id prompts (default)")
    src.add_argument(
        "--prompts", default=None, metavar="FILE", help='lines of text or {"prompt": ...}'
    )
    s.add_argument("--max-token-id", type=int, default=10000, help="random prompt ids up to")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0, help="prompts, lengths and arrivals")
    s.add_argument("--time-limit", type=float, default=600.0, metavar="S", help="whole run")
    s.add_argument("--request-timeout", type=float, default=300.0, metavar="S")
    s.add_argument(
        "--wait", type=float, default=0.0, metavar="S", help="first wait up to S s for /health"
    )
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", default=None, metavar="FILE", help="write the result here too")
    s.add_argument("--chart", default=None, metavar="FILE.png", help="latency percentiles")
    own = s.add_argument_group(
        "a server of its own (instead of one already running at --url)",
        "With --random-weights --config NAME, start `pegboard serve` with random weights of "
        "that config on --url's port, wait until it is ready, benchmark it, then stop it.",
    )
    own.add_argument("--random-weights", action="store_true", help="start a dummy-weight server")
    own.add_argument("--config", default=None, help="bundled config name, or a config.json path")
    own.add_argument(
        "--server-args", default="", metavar="'FLAGS'", help="more `pegboard serve` flags"
    )
    s.set_defaults(func=run_serve_cmd)


def _start_server(args: argparse.Namespace) -> subprocess.Popen:
    """`pegboard serve` with random weights of `--config` on `--url`'s host and port."""
    from urllib.parse import urlsplit

    from pegboard.core.bench.models import random_weights_model_dir

    if not args.config:
        raise ValueError("--random-weights needs --config NAME")
    url = urlsplit(args.url)
    model_dir = random_weights_model_dir(args.config)
    name = args.model or ("random-weights" if Path(args.config).exists() else args.config)
    cmd = [
        sys.executable, "-m", "pegboard.core.cli.main", "serve",
        "--model", str(model_dir), "--load-format", "dummy", "--served-model-name", name,
        "--host", url.hostname or "127.0.0.1", "--port", str(url.port or 80),
        *shlex.split(args.server_args),
    ]  # fmt: skip
    print(f"pegboard bench serve: starting {' '.join(cmd)}", file=sys.stderr)
    return subprocess.Popen(cmd)


def _exited(server: subprocess.Popen) -> str | None:
    if server.poll() is None:
        return None
    return f"the server exited with code {server.returncode} before it was ready (see above)"


def _stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then kill if it has not exited within 60 s."""
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _add_common(p: argparse.ArgumentParser) -> None:
    from pegboard.core.bench.models import bundled_configs

    p.add_argument("--random-weights", action="store_true", help="random weights from --config")
    p.add_argument(
        "--config",
        default=None,
        help=f"bundled real config (with --random-weights): one of {', '.join(bundled_configs())}",
    )
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


def _run(
    args: argparse.Namespace,
    bench: Callable[[Any], dict],
    peer: Callable[[Any, Any], dict] | None = None,
    chart: Callable[[dict, str], Any] | None = None,
) -> int:
    """Build the LLM from the flags, run `bench(llm)`; then, with the LLM released,
    `peer(model_dir, model_info)` if given; print and save the result."""
    try:
        settings = _settings(args)
    except ValueError as e:
        print(f"pegboard bench: {e}", file=sys.stderr)
        return 2
    result, model_dir, info = _run_pegboard(args, settings, bench)
    if peer is not None:
        gc.collect()  # the engine's model and KV pool, before the peer allocates its own
        if info.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        result["peer"] = peer(model_dir, info)
        peer_tok_s = result["peer"]["output_tok_s"]
        result["pegboard_vs_peer"] = (
            float(f"{result['output_tok_s'] / peer_tok_s:.4g}") if peer_tok_s else None
        )
    _emit(result, args.json)
    if chart is not None and args.chart:
        chart(result, args.chart)
    return 0


def _run_pegboard(args: argparse.Namespace, settings: dict[str, Any], bench) -> tuple:
    """The bench result with the run's facts, the model directory and its `ModelInfo`; the
    LLM is closed and unreferenced when this returns."""
    from pegboard.core.llm import LLM

    with LLM(**settings) as llm:
        facts = {
            "device": _device_name(llm),
            "model": args.config if args.random_weights else str(llm.engine.model_dir),
            "plugins": {
                slot: llm.engine.plugins.active(slot).name
                for slot in ("scheduler", "kv_cache", "attention", "sampler")
            },
        }
        result = {"engine": "pegboard"} | bench(llm) | facts
        return result, llm.engine.model_dir, llm.engine.info


def _emit(result: dict, json_path: str | None, unprinted: tuple[str, ...] = ()) -> None:
    """Stamp the command and date on `result`, print it (less the `unprinted` keys) and write
    all of it to `json_path`."""
    result["command"] = "pegboard " + " ".join(sys.argv[1:])
    result["date"] = datetime.date.today().isoformat()
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in unprinted}, indent=2))


def run_offline_cmd(args: argparse.Namespace) -> int:
    from pegboard.core.bench.offline import OfflineWorkload, run_offline

    workload = OfflineWorkload(
        num_seqs=args.num_seqs,
        min_input=args.min_input,
        max_input=args.max_input,
        min_output=args.min_output,
        max_output=args.max_output,
        max_token_id=args.max_token_id,
        seed=args.workload_seed,
    )
    peer = None
    if args.peer:
        from pegboard.core.bench.peer import run_peer

        def peer(model_dir, info) -> dict:
            return run_peer(
                args.peer,
                model_dir,
                workload,
                dtype=info.dtype,
                device=info.device,
                timeout=args.peer_timeout,
            )

    from pegboard.core.bench.chart import offline_chart

    return _run(
        args,
        lambda llm: run_offline(
            llm,
            workload,
            profile_host=args.profile_host,
            torch_profile=args.torch_profile,
            torch_profile_steps=_skip_count(args.torch_profile_steps),
        ),
        peer,
        offline_chart,
    )


def _skip_count(text: str) -> tuple[int, int]:
    try:
        skip, count = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--torch-profile-steps: expected SKIP,COUNT, got {text!r}") from None
    if skip < 0 or count < 1:
        raise SystemExit(f"--torch-profile-steps: SKIP >= 0 and COUNT >= 1, got {text!r}")
    return skip, count


def run_prefix_cmd(args: argparse.Namespace) -> int:
    from pegboard.core.bench.prefix import run_prefix_bench, workload_from_args
    from pegboard.core.bench.routing import run_router_prefix_cmd

    if args.router_policies:  # over HTTP through `serve --dp-size`, once per policy
        return run_router_prefix_cmd(args)
    workload = workload_from_args(args)
    return _run(args, lambda llm: run_prefix_bench(lambda: llm, workload, progress=True))


def run_serve_cmd(args: argparse.Namespace) -> int:
    import httpx
    from pegboard.core.bench.chart import serve_chart
    from pegboard.core.bench.serve import ServeWorkload, run_serve_bench

    workload = ServeWorkload(
        num_prompts=args.num_prompts,
        min_input=args.min_input,
        max_input=args.max_input,
        min_output=args.min_output,
        max_output=args.max_output,
        max_token_id=args.max_token_id,
        prompts_file=args.prompts,
        temperature=args.temperature,
        seed=args.seed,
    )
    server = None
    if args.random_weights:
        try:
            server = _start_server(args)
        except (ValueError, OSError) as e:
            print(f"pegboard bench serve: {e}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(
            run_serve_bench(
                args.url,
                workload,
                model=args.model,
                concurrency=args.concurrency,
                request_rate=args.request_rate,
                time_limit=args.time_limit,
                request_timeout=args.request_timeout,
                ready_timeout=max(args.wait, 900.0) if server else args.wait,
                progress=not args.no_progress,
                server_gone=None if server is None else lambda: _exited(server),
            )
        )
    except (ValueError, OSError) as e:
        print(f"pegboard bench serve: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"pegboard bench serve: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            _stop_server(server)
    if server is not None:
        result["server"] = {"config": args.config, "load_format": "dummy", "args": server.args}
    _emit(result, args.json, unprinted=("per_request",))
    if args.chart:
        serve_chart(result, args.chart)
    return 0 if result["failed"] == 0 else 1
