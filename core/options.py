"""Command-line flags generated from the discovered plugins: one argument group per slot with
its selection flag (`--scheduler`) and every plugin's options (`--sjf-max-wait-steps`)."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.slots import SLOTS

#: Flags that could not be added (a name collision), as messages; shown by `pegboard plugins`.
warnings: list[str] = []

_DEST_PREFIX = "plugin_opt__"


def _dest(plugin: str, field: str) -> str:
    return f"{_DEST_PREFIX}{plugin}__{field}"


def _flag(plugin: str, field: str) -> str:
    return f"--{plugin}-{field}".replace("_", "-").lower()


def _parser_for(annotation: Any):
    """An argparse `type` for a pydantic field: scalars as themselves, the rest as JSON."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _parser_for(args[0])
    if annotation in (int, float, str):
        return annotation
    if origin is typing.Literal:
        return str
    return json.loads


def add_plugin_arguments(parser: argparse.ArgumentParser, manager: PluginManager) -> None:
    """Add, per slot, its selection flag and the options of every plugin discovered for it.

    Option flags default to `argparse.SUPPRESS`, so only options the user gave are collected."""
    taken = {a for action in parser._actions for a in action.option_strings}
    for slot, spec in SLOTS.items():
        group = parser.add_argument_group(f"{slot} plugins")
        names = [i.name for i in manager.catalog() if i.slot == slot and i.cls is not None]
        listing = ", ".join(names) or "none installed"
        if spec.multi:
            group.add_argument(
                spec.flag,
                nargs="+",
                default=None,
                dest=slot,
                metavar="NAME",
                help=f"enable these {slot} plugins ({listing})",
            )
        else:
            default = f" (default: {spec.default})" if spec.default else ""
            group.add_argument(
                spec.flag,
                default=None,
                dest=slot,
                metavar="NAME",
                help=f"{slot} plugin: {listing}{default}",
            )
        taken.add(spec.flag)
        for info in manager.catalog():
            if info.slot != slot or info.cls is None:
                continue
            for field, f in info.cls.Options.model_fields.items():
                flag = _flag(info.name, field)
                if flag in taken:
                    warnings.append(f"{info.name}: option {field} not exposed: {flag} is taken")
                    continue
                taken.add(flag)
                help_text = f"[{info.name}] {f.description or field}"
                if not f.is_required():
                    help_text += f" (default: {f.get_default(call_default_factory=True)})"
                if f.annotation is bool:
                    group.add_argument(
                        flag,
                        dest=_dest(info.name, field),
                        default=argparse.SUPPRESS,
                        action=argparse.BooleanOptionalAction,
                        help=help_text,
                    )
                else:
                    group.add_argument(
                        flag,
                        dest=_dest(info.name, field),
                        default=argparse.SUPPRESS,
                        type=_parser_for(f.annotation),
                        metavar=field.upper(),
                        help=help_text,
                    )


def collect_plugin_options(args: argparse.Namespace, manager: PluginManager) -> dict[str, dict]:
    """{plugin name: {field: value}} for the option flags the user gave."""
    options: dict[str, dict] = {}
    for key, value in vars(args).items():
        if key.startswith(_DEST_PREFIX):
            plugin, field = key[len(_DEST_PREFIX) :].split("__", 1)
            options.setdefault(plugin, {})[field] = value
    return options
