"""`pegboard serve --dp-size N`: N engine replicas, each its own `pegboard serve` process on a
loopback port (on CUDA each with its own GPUs through `CUDA_VISIBLE_DEVICES`), behind the
router on the serve port.

A replica gets the serve command's own flags (so `--model`, budgets, plugins and their
options, `--config` apply to each), with `--dp-size 1`, its port, and `--host 127.0.0.1`.
GPUs per replica: `--tp-size` where it exists (tensor parallelism), else 1 — replica `i` gets
the visible GPUs `[i * tp, (i + 1) * tp)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys

log = logging.getLogger("pegboard.router")

#: Destinations never passed to a replica: the launcher's own, or set per replica.
_NOT_FORWARDED = {"help", "dp_size", "host", "port", "func", "resolve", "dp_parser"}


def add_dp_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dp-size` (SGLang's name; vLLM's `--data-parallel-size` is an alias)."""
    g = parser.add_argument_group("data parallelism")
    g.add_argument(
        "--dp-size",
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="run N engine replicas behind a router on --port (policy: --router-policy; "
        "default 1: no router)",
    )
    g.add_argument(
        "--router-health-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="with --dp-size: seconds between the router's health and load checks (default 2)",
    )
    parser.set_defaults(dp_parser=parser)


def serve_data_parallel(args: argparse.Namespace) -> int | None:
    """Run `pegboard serve` as N replicas behind the router when `--dp-size` > 1 (returns the
    exit status); None when `--dp-size` is 1, for the caller to serve as usual. `args` is the
    namespace as parsed (only the flags the user gave)."""
    resolved = args.resolve(args)
    dp = resolved.dp_size
    if dp == 1:
        return None
    if dp < 1:
        return _usage(f"--dp-size must be at least 1, not {dp}")
    try:
        gpu_sets = gpu_partition(resolved.device, dp, getattr(resolved, "tp_size", 1) or 1)
        settings = _router_settings(resolved, dp)
    except ValueError as e:  # PluginError (a bad policy or option) reaches main's handler
        return _usage(str(e))
    logging.basicConfig(
        level=resolved.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pegboard.core.router.serve import run_router

    ports = [free_port() for _ in range(dp)]
    settings.workers = [f"http://127.0.0.1:{p}" for p in ports]
    base = replica_argv(args)
    children = []
    try:
        for i, port in enumerate(ports):
            env = dict(os.environ)
            if gpu_sets is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_sets[i])
            else:  # CPU: share the cores instead of each replica taking all of them
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // dp)))
            argv = [*base, "--dp-size", "1", "--host", "127.0.0.1", "--port", str(port)]
            log.info("replica %d: port %d%s", i, port, _gpus_note(env, gpu_sets))
            children.append(subprocess.Popen(argv, env=env))
        return run_router(settings, resolved.host, resolved.port, resolved.log_level, children)
    finally:
        stop_replicas(children, timeout=resolved.drain_timeout + 30)


def _router_settings(resolved: argparse.Namespace, dp: int):
    from pegboard.core.options import collect_plugin_options
    from pegboard.core.plugin_manager import PluginManager
    from pegboard.core.router.app import RouterSettings, select_policy

    policy = getattr(resolved, "router", None) or RouterSettings.policy
    pm = PluginManager()
    options = collect_plugin_options(resolved, pm).get(policy, {})
    settings = RouterSettings(
        workers=[f"http://127.0.0.1:{i}" for i in range(dp)],  # real ports come later
        policy=policy,
        policy_options=options,
        health_interval=resolved.router_health_interval,
        min_ready=dp,
    )
    select_policy(settings, pm)  # fail on a bad policy before starting any replica
    return settings


def gpu_partition(device: str, dp: int, per_replica: int) -> list[list[str]] | None:
    """The visible GPU ids of each replica, or None to run on CPU (no partition)."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise ValueError(f"--device {device}: no CUDA device is available")
        return None
    if device not in ("auto", "cuda"):
        raise ValueError(
            f"--device {device} with --dp-size {dp}: each replica gets its own GPUs; choose "
            "them with CUDA_VISIBLE_DEVICES and leave --device as auto or cuda"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else None
    ids = ids or [str(i) for i in range(torch.cuda.device_count())]
    need = dp * per_replica
    if need > len(ids):
        raise ValueError(
            f"--dp-size {dp} x {per_replica} GPU(s) per replica needs {need} GPUs; "
            f"{len(ids)} visible ({', '.join(ids) or 'none'})"
        )
    return [ids[i * per_replica : (i + 1) * per_replica] for i in range(dp)]


def replica_argv(args: argparse.Namespace) -> list[str]:
    """The `pegboard serve` command line of one replica: the flags the user gave, rebuilt from
    the parsed namespace (so `main(argv)` and `python -m` callers work alike)."""
    parser: argparse.ArgumentParser = args.dp_parser
    actions = {a.dest: a for a in parser._actions}
    argv = [sys.executable, "-m", "pegboard.core.cli.main", "serve"]
    for dest, value in vars(args).items():
        action = actions.get(dest)
        if action is None or dest in _NOT_FORWARDED or not action.option_strings:
            continue
        argv += _flag(action, value)
    return argv


def _flag(action: argparse.Action, value) -> list[str]:
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(action, argparse._StoreFalseAction):
        return [] if value else [flag]
    if isinstance(action, argparse._AppendAction):
        return [part for v in value for part in (flag, _text(v))]
    if action.nargs in ("+", "*") and isinstance(value, list):
        return [flag, *map(_text, value)]
    return [flag, _text(value)]


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def stop_replicas(children: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every replica (each drains), then kill those still running after `timeout`."""
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        try:
            c.wait(timeout)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus_note(env: dict[str, str], gpu_sets) -> str:
    return f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpu_sets else ""


def _usage(message: str) -> int:
    print(f"pegboard serve: {message}", file=sys.stderr)
    return 2
