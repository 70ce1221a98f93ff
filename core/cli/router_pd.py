"""`pegboard router --pd --prefill URL [BOOTSTRAP_PORT] ... --decode URL ...`: the router in
front of prefill and decode engines (`pegboard.core.router.pd`), sglang-router's flags."""

from __future__ import annotations

import argparse
import logging


def add_pd_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prefill/decode disaggregation (docs/architecture.md)")
    g.add_argument(
        "--pd",
        "--pd-disaggregation",
        action="store_true",
        dest="pd",
        help="route each request to a prefill and a decode worker (instead of --worker)",
    )
    g.add_argument(
        "--prefill",
        action="append",
        nargs="+",
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill worker and its --disaggregation-bootstrap-port (default 8998); repeat",
    )
    g.add_argument("--decode", action="append", metavar="URL", help="a decode worker; repeat")
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the prefill-only warm-up request sent to each prefill worker at start",
    )


def run_pd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pegboard.core.cli.router import worker_url
    from pegboard.core.options import collect_plugin_options
    from pegboard.core.plugin_manager import PluginManager
    from pegboard.core.router.pd import DEFAULT_BOOTSTRAP_PORT, PDSettings, create_pd_app
    from pegboard.core.router.serve import serve_app

    if args.worker:
        parser.error("--pd routes to --prefill and --decode workers; --worker is not used")
    if not args.prefill or not args.decode:
        parser.error("--pd needs at least one --prefill URL and one --decode URL")
    prefill = []
    for entry in args.prefill:
        if len(entry) > 2 or (len(entry) == 2 and not entry[1].isdigit()):
            parser.error(f"--prefill {' '.join(entry)}: expected URL [BOOTSTRAP_PORT]")
        port = int(entry[1]) if len(entry) == 2 else DEFAULT_BOOTSTRAP_PORT
        prefill.append((worker_url(parser, entry[0]), port))
    decode = [worker_url(parser, u) for u in args.decode]
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    policy = args.router or PDSettings.policy
    settings = PDSettings(
        prefill=prefill,
        decode=decode,
        policy=policy,
        policy_options=collect_plugin_options(args, PluginManager()).get(policy, {}),
        health_interval=args.health_interval,
        request_timeout=args.request_timeout,
        warmup=not args.no_warmup,
    )
    return serve_app(create_pd_app(settings), args.host, args.port)
