"""`pegboard` — the command line. Each subcommand lives in its own module of this package and
exposes `add_parser(subparsers)` (which sets `func` on its parser)."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules, in `--help` order.
COMMANDS = ["serve", "router", "generate", "plugins", "plugin", "bench", "kernels", "spec"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pegboard", description="An LLM inference engine whose every feature is a plugin."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pegboard.core.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pegboard.core.cli.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for a user: printed without a traceback."""
    import pydantic
    from pegboard.core.cli.preflight import PortInUse
    from pegboard.core.context_fit import KVCapacityError
    from pegboard.core.engine import KVMemoryError, RequestRejected
    from pegboard.core.models import ModelLoadError
    from pegboard.core.plugin_manager import PluginError
    from pegboard.core.swap import SwapError
    from pegboard.core.tokenizer import TokenizerError
    from pegboard.sdk.patch import PatchError

    return (
        PluginError,
        PatchError,
        ModelLoadError,
        TokenizerError,
        RequestRejected,
        KVMemoryError,
        SwapError,
        PortInUse,
        KVCapacityError,
        pydantic.ValidationError,
    )


def main(argv: list[str] | None = None) -> int:
    from pegboard.core.process_exit import skip_final_collection
    from pegboard.core.watchdog import stacks_on_sigusr1

    stacks_on_sigusr1()
    if argv is None:  # a process of its own (not a caller's `main([...])`)
        skip_final_collection()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"pegboard {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
