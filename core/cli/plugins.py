"""`pegboard plugins [--json]` — every discovered plugin and patch: name, slot, distribution and
version, state (active / available / disabled / failed: reason / gated out: reason) and declared
options. The first thing to run after installing a plugin; a broken one is shown, not fatal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plugins",
        help="list installed plugins and patches",
        description="List every plugin and patch discovered through entry points.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def listing() -> dict[str, Any]:
    """What `pegboard plugins --json` prints: plugins, patches and option-flag warnings."""
    from pegboard.core import options
    from pegboard.core.patches import discover_patches
    from pegboard.core.plugin_manager import PluginManager

    manager = PluginManager()
    options.add_plugin_arguments(argparse.ArgumentParser(add_help=False), manager)
    return {
        "plugins": [info.to_dict() for info in manager.catalog()],
        "patches": [info.to_dict() for info in discover_patches().values()],
        "warnings": list(options.warnings),
    }


def run(args: argparse.Namespace) -> int:
    data = listing()
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(data))
    return 0


def render(data: dict[str, Any]) -> str:
    """The human-readable table, options indented under their plugin."""
    from pegboard.core.options import option_flag

    plugins = data["plugins"]
    table = _table(
        ("SLOT", "NAME", "DISTRIBUTION", "STATE"),
        [(p["slot"] or "?", p["name"], _dist(p), p["state"]) for p in plugins],
    )
    lines = [table[0]]
    for p, row in zip(plugins, table[1:]):
        lines.append(row)
        for opt in p["options"]:
            default = "required" if opt["required"] else f"default {opt['default']!r}"
            flag = option_flag(p["name"], opt["name"])
            about = f"  {opt['description']}" if opt["description"] else ""
            lines.append(f"    {flag} {opt['type']} ({default}){about}")
    lines.append("")
    if data["patches"]:
        rows = [(p["name"], p["target"] or "?", _dist(p), p["state"]) for p in data["patches"]]
        lines += _table(("PATCH", "TARGET", "DISTRIBUTION", "STATE"), rows)
    else:
        lines.append("No patches installed (entry-point group pegboard.patches).")
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"


def _dist(record: dict[str, Any]) -> str:
    if record["distribution"]:
        return f"{record['distribution']} {record['version'] or ''}".strip()
    return "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        return "  ".join([*cells, str(row[-1])])

    return [line(header)] + [line(r) for r in rows]
