"""`pegboard` — the command line. Each subcommand lives in its own module of this package and
exposes `add_parser(subparsers)` (which sets `func` on its parser)."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules, in `--help` order.
COMMANDS = ["serve", "generate", "plugins", "plugin", "bench", "kernels"]


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
