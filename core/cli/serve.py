"""`pegboard serve` — the OpenAI-compatible HTTP server.

Flags come in groups: server flags (below), model and engine flags, one group per slot with the
slot's selection flag and its plugins' options (`core/cli/engine_args.py`). `--config FILE.yaml`
holds the same settings (keys are flag names, with dashes or underscores); a flag given on the
command line overrides the file, which overrides the built-in defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings
from pegboard.core.disaggregation import add_disaggregation_arguments
from pegboard.core.router.replicas import add_dp_arguments, serve_data_parallel
from pegboard.core.server.limits import DEFAULT_MAX_REQUEST_BYTES
from pegboard.core.watchdog import WATCHDOG_EXIT_STATUS

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /admin).",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    g.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of settings (keys: flag names; default: none)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="model name(s) clients send (default: the --model argument, or the bundled model's name)",
    )
    g.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 (env PEGBOARD_API_KEY; default: none, "
        "/v1 is open)",
    )
    g.add_argument(
        "--admin-token",
        help="enable /admin, /start_profile and /stop_profile, guarded by 'Authorization: Bearer "
        "TOKEN' (env PEGBOARD_ADMIN_TOKEN; default: none, the admin API is off)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds in-flight requests may run before they are aborted (default 30)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="request bodies larger than this are answered 413 without being read "
        f"(default {DEFAULT_MAX_REQUEST_BYTES}, 32 MiB)",
    )
    g.add_argument(
        "--stream-interval",
        type=positive_int,
        default=1,
        metavar="N",
        help="a streamed choice sends its first token at once, then an event per N tokens (and "
        "its last); fewer events cost the server less CPU per token (default 1)",
    )
    g.add_argument(
        "--switch-interval",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="the interpreter's thread switch interval in this process (sys.setswitchinterval; "
        "default Python's 0.005): at most how long the step loop waits for the GIL while the "
        "HTTP thread holds it",
    )
    g.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="server log level (default info)"
    )
    g.add_argument(
        "--watchdog-timeout",
        type=float,
        default=None,
        metavar="S",
        help="an engine step that has not finished after S seconds logs the stuck state and "
        f"exits with status {WATCHDOG_EXIT_STATUS} so a supervisor restarts the server "
        "(default: no watchdog)",
    )
    g.add_argument(
        "--skip-warmup",
        action="store_true",
        help="answer /health 200 as soon as the model is loaded, without first running a dummy "
        "request (which triggers kernel JIT/autotuning before the first user arrives)",
    )
    add_engine_arguments(p)
    add_dp_arguments(p)  # --dp-size: replicas behind the router (core/router/replicas.py)
    add_disaggregation_arguments(p)  # --disaggregation-mode prefill|decode (PD)
    defaults = _suppress_defaults(p)
    p.set_defaults(func=run, resolve=lambda args: resolve(args, p, defaults))


def _suppress_defaults(p: argparse.ArgumentParser) -> dict[str, Any]:
    """Make flags the user did not give absent from the namespace (so they can yield to
    `--config`); returns the defaults they had."""
    defaults = {}
    for action in p._actions:
        if action.dest != "help" and action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
    return defaults


def resolve(
    args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict[str, Any]
) -> argparse.Namespace:
    """Defaults, overridden by the `--config` file, overridden by explicit flags."""
    explicit = vars(args)
    from_file = load_config(explicit["config"], parser) if explicit.get("config") else {}
    return argparse.Namespace(**{**defaults, **from_file, **explicit})


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of a YAML file, keyed by flag destination; unknown keys are an error."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config {path}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
        actions.setdefault(action.dest, action)
    settings = {}
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            parser.error(f"--config {path}: unknown setting {key!r}")
        settings[action.dest] = _convert(action, value, path, parser)
    return settings


def _convert(action: argparse.Action, value: Any, path: str, parser: argparse.ArgumentParser):
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    values = value if isinstance(value, list) else [value]
    if action.type is not None:
        try:
            values = [action.type(v) if isinstance(v, str) else v for v in values]
        except (TypeError, ValueError) as e:
            parser.error(f"--config {path}: {action.dest}: {e}")
    if action.choices is not None:
        for v in values:
            if v not in action.choices:
                parser.error(
                    f"--config {path}: {action.dest}: {v!r} is not one of {list(action.choices)}"
                )
    return values if many else values[0]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def run(args: argparse.Namespace) -> int:
    import pydantic
    from pegboard.core.async_engine import AsyncEngine
    from pegboard.core.cli.engine_args import read_chat_template, use_chat_template
    from pegboard.core.cli.preflight import bind_listening_socket, check_before_loading
    from pegboard.core.config import EngineConfig
    from pegboard.core.default_model import MODEL_NAME
    from pegboard.core.distributed.cli import serve_follower
    from pegboard.core.server.lifecycle import ServerSettings, ServerState
    from pegboard.core.server.runner import run_server

    if (status := serve_data_parallel(args)) is not None:
        return status
    args = args.resolve(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = engine_settings(args)
        settings["metrics"] = with_prometheus(settings.get("metrics"))
        config = EngineConfig(**settings)
        template = read_chat_template(args)
    except (pydantic.ValidationError, ValueError) as e:
        print(f"pegboard serve: {e}", file=sys.stderr)
        return 2
    check_before_loading(config)
    if (status := serve_follower(config)) is not None:  # bad TP settings, or not rank 0
        return status
    names = args.served_model_name or [config.model or MODEL_NAME]
    config.plugin_options.setdefault("prometheus", {}).setdefault("model_name", names[0])
    server = ServerSettings(
        served_model_names=list(names),
        api_key=args.api_key or os.environ.get("PEGBOARD_API_KEY") or None,
        admin_token=args.admin_token or os.environ.get("PEGBOARD_ADMIN_TOKEN") or None,
        drain_timeout=args.drain_timeout,
        max_request_bytes=args.max_request_bytes,
        switch_interval=args.switch_interval,
        warmup=not args.skip_warmup,
    )

    def engine_factory() -> AsyncEngine:
        engine = AsyncEngine.from_config(
            config, watchdog_timeout=args.watchdog_timeout, stream_interval=args.stream_interval
        )
        use_chat_template(engine.tokenizer, template)
        return engine

    sock = bind_listening_socket(args.host, args.port)  # a busy port fails before loading
    state = ServerState(server, engine_factory=engine_factory)
    return run_server(state, args.host, args.port, args.log_level, sock)


def with_prometheus(metrics: str | list[str] | None) -> list[str]:
    """The metrics exporters to enable: `prometheus` (it backs /metrics) plus those asked for."""
    asked = [metrics] if isinstance(metrics, str) else list(metrics or [])
    return list(dict.fromkeys(["prometheus", *asked]))
