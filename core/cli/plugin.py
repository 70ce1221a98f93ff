"""`pegboard plugin new NAME --slot SLOT [--dir PATH]` — generate a pip-installable plugin
package that passes its own conformance tests as generated (`pegboard.sdk.scaffold`)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pegboard.sdk.scaffold import TEMPLATED_SLOTS

    p = subparsers.add_parser("plugin", help="plugin author tools (new: generate a package)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser(
        "new",
        help="generate a plugin package",
        description="Write pegboard-NAME/: pyproject with the entry point, a working "
        "implementation of the slot, and a test running the conformance kit.",
    )
    new.add_argument("name", metavar="NAME", help="plugin name users select, e.g. fair-share")
    new.add_argument("--slot", required=True, choices=TEMPLATED_SLOTS)
    new.add_argument("--dir", default=".", help="where to create pegboard-NAME/ (default: .)")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    from pegboard.sdk.scaffold import ScaffoldError, create_plugin_package

    try:
        root = create_plugin_package(args.name, args.slot, args.dir)
    except ScaffoldError as e:
        print(f"pegboard plugin new: {e}", file=sys.stderr)
        return 2
    print(f"created {root}")
    print(f"  pip install -e {root}   # register the entry point")
    print(f"  pytest {root / 'tests'}   # the conformance kit")
    print("  pegboard plugins   # lists it")
    return 0
