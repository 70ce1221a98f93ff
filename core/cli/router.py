"""`pegboard router --worker URL ...` — one OpenAI-compatible address in front of several
servers (pegboard or any other OpenAI-compatible one), routing each request with a `router`
plugin (`--router-policy round_robin | least_load | cache_aware | ...`)."""

from __future__ import annotations

import argparse
import logging
from urllib.parse import urlsplit

from pegboard.core.cli.router_pd import add_pd_arguments, run_pd

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pegboard.core.options import add_plugin_arguments
    from pegboard.core.plugin_manager import PluginManager

    p = sub.add_parser(
        "router",
        help="route requests across several OpenAI-compatible servers",
        description="Route /v1/completions and /v1/chat/completions across workers (health "
        "checks, retry on another worker, streaming pass-through); GET /health, /metrics, "
        "/workers.",
    )
    p.add_argument(
        "--worker",
        action="append",
        metavar="URL",
        help="a worker's base URL, e.g. http://127.0.0.1:8001 (repeat for each worker)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    p.add_argument(
        "--health-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between health and load checks of each worker (default 2)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a forwarded request may take (default 600)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    add_plugin_arguments(p, PluginManager(), slots=["router"])
    add_pd_arguments(p)  # --pd --prefill URL [PORT] --decode URL (core/cli/router_pd.py)
    p.set_defaults(func=lambda args: run(args, p))


def worker_url(parser: argparse.ArgumentParser, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https":
        parser.error(
            f"--worker {url!r}: the router speaks plain http to its workers (terminate TLS in "
            "front of the router)"
        )
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        parser.error(f"--worker {url!r}: expected a base URL such as http://127.0.0.1:8001")
    return url.rstrip("/")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pegboard.core.options import collect_plugin_options
    from pegboard.core.plugin_manager import PluginManager
    from pegboard.core.router.app import RouterSettings
    from pegboard.core.router.serve import run_router

    if args.pd:
        return run_pd(args, parser)
    if not args.worker:
        parser.error("the following arguments are required: --worker (or --pd)")
    workers = [worker_url(parser, u) for u in args.worker]
    if len(set(workers)) != len(workers):
        parser.error("--worker: the same URL is given twice")
    if args.health_interval <= 0 or args.request_timeout <= 0:
        parser.error("--health-interval and --request-timeout must be positive")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    policy = args.router or RouterSettings.policy
    settings = RouterSettings(
        workers=workers,
        policy=policy,
        policy_options=collect_plugin_options(args, PluginManager()).get(policy, {}),
        health_interval=args.health_interval,
        request_timeout=args.request_timeout,
    )
    return run_router(settings, args.host, args.port, args.log_level)
