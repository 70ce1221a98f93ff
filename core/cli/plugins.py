"""`pegboard plugins [--json]` — every discovered plugin and patch: name, slot, distribution and
version, which plugin each slot uses by default on this machine and which it would use with the
given selection flags (`--scheduler sjf`, ...: "active"), state (available / unavailable: reason
/ disabled / failed: reason / gated out: reason) and declared options. The first thing to run
after installing a plugin; a broken one is shown, not fatal."""

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
    from pegboard.sdk.slots import SLOTS

    g = p.add_argument_group(
        "selection", "mark what serve/generate would use with these flags as active"
    )
    for slot, spec in SLOTS.items():
        if spec.flag:
            g.add_argument(
                spec.flag,
                dest=f"select_{slot}",
                metavar="NAME",
                action="append" if spec.multi else "store",
                help=f"the {slot} plugin (default: {spec.default or 'none'})",
            )
    p.set_defaults(func=run)


def listing(selection: dict[str, str | list[str] | None] | None = None) -> dict[str, Any]:
    """What `pegboard plugins --json` prints: plugins (each marked `default` and `active`: the
    plugin its slot uses on this machine without a flag, and with `selection`), patches and
    option-flag warnings."""
    from pegboard.core import options
    from pegboard.core.patches import discover_patches
    from pegboard.core.plugin_manager import PluginManager, slot_default

    manager = PluginManager()
    options.add_plugin_arguments(argparse.ArgumentParser(add_help=False), manager)
    selection = selection or {}
    plugins = []
    for info in manager.catalog():
        record = info.to_dict()
        chosen = selection.get(info.slot) or slot_default(info.slot) if info.slot else None
        record["active"] = info.name in (chosen if isinstance(chosen, list) else [chosen])
        plugins.append(record)
    return {
        "plugins": plugins,
        "patches": [info.to_dict() for info in discover_patches().values()],
        "warnings": list(options.warnings),
    }


def run(args: argparse.Namespace) -> int:
    selection = {
        key.removeprefix("select_"): value
        for key, value in vars(args).items()
        if key.startswith("select_") and value
    }
    data = listing(selection)
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
        ("SLOT", "NAME", "DISTRIBUTION", "CHOICE", "STATE"),
        [(p["slot"] or "?", p["name"], _dist(p), _choice(p), p["state"]) for p in plugins],
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


def _choice(record: dict[str, Any]) -> str:
    marks = [m for m in ("default", "active") if record.get(m)]
    return ",".join(marks) or "-"


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
