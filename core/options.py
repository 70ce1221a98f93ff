"""Command-line flags generated from the discovered plugins: one argument group per slot with
its selection flag (`--scheduler`) and every plugin's options (`--sjf-max-wait-steps`).

Option flags default to "not given" (`argparse.SUPPRESS`), so `collect_plugin_options` returns
only what the user typed and each plugin's own defaults stay in its `Options` model. Values are
parsed loosely here (int, float, str, JSON for lists and dicts) and validated by the plugin's
model when the engine creates the plugin (`OptionsError` names the bad field).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from pegboard.core.plugin_manager import OptionsError, PluginInfo, PluginManager
from pegboard.sdk.slots import SLOTS
from pydantic.fields import FieldInfo

__all__ = ["OptionsError", "add_plugin_arguments", "collect_plugin_options", "warnings"]

#: Option flags the last `add_plugin_arguments` call could not add (name collisions).
warnings: list[str] = []

_DEST_PREFIX = "plugin_option:"


def option_flag(plugin: str, field: str) -> str:
    """The flag of a plugin option: `--<plugin>-<field>` with `_` written as `-`."""
    return f"--{plugin}-{field}".replace("_", "-").lower()


def add_plugin_arguments(
    parser: argparse.ArgumentParser, manager: PluginManager, slots: list[str] | None = None
) -> None:
    """Add, per slot (every slot, or those in `slots`), its selection flag and the options of
    every plugin loaded for it.

    A flag that is already taken (by the parser or an earlier plugin) is skipped and the
    collision is recorded in `warnings`, so one plugin's odd option cannot break the CLI."""
    warnings.clear()
    taken = {flag for action in parser._actions for flag in action.option_strings}
    usable = [i for i in manager.catalog() if i.cls is not None and not i.disabled]
    for slot, spec in SLOTS.items():
        if slots is not None and slot not in slots:
            continue
        group = parser.add_argument_group(f"{slot} plugins")
        plugins = [i for i in usable if i.slot == slot]
        listing = ", ".join(i.name for i in plugins) or "none installed"
        if spec.flag in taken:
            warnings.append(f"slot {slot}: selection flag {spec.flag} is taken; not added")
        elif spec.multi:
            group.add_argument(
                spec.flag,
                nargs="+",
                dest=slot,
                default=None,
                metavar="NAME",
                help=f"enable these {slot} plugins (any of: {listing})",
            )
        else:
            default = f"; default: {spec.default}" if spec.default else ""
            group.add_argument(
                spec.flag,
                dest=slot,
                default=None,
                metavar="NAME",
                help=f"{slot} plugin ({listing}{default})",
            )
        taken.add(spec.flag)
        for info in plugins:
            for field, model_field in info.cls.Options.model_fields.items():
                _add_option(group, info, field, model_field, taken)


def _add_option(
    group: argparse._ArgumentGroup,
    info: PluginInfo,
    field: str,
    model_field: FieldInfo,
    taken: set[str],
) -> None:
    flag = option_flag(info.name, field)
    negative = flag.replace("--", "--no-", 1)
    is_bool = model_field.annotation is bool
    if flag in taken or (is_bool and negative in taken):
        warnings.append(f"{info.label}: option {field!r} not exposed, {flag} is taken")
        return
    taken.update({flag, negative} if is_bool else {flag})
    help_text = f"[{info.name}] {model_field.description or field}"
    if not model_field.is_required():
        help_text += f" (default: {model_field.get_default(call_default_factory=True)})"
    kwargs: dict[str, Any] = {
        "dest": f"{_DEST_PREFIX}{info.name}:{field}",
        "default": argparse.SUPPRESS,
        "help": help_text.replace("%", "%%"),  # argparse formats help with %
    }
    if is_bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    choices = _literal_choices(model_field.annotation)
    group.add_argument(
        flag,
        type=_value_parser(model_field.annotation),
        choices=choices,
        metavar=None if choices else field.upper(),
        **kwargs,
    )


def collect_plugin_options(
    args: argparse.Namespace, manager: PluginManager
) -> dict[str, dict[str, Any]]:
    """{plugin name: {field: value}} for the option flags the user actually gave."""
    options: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith(_DEST_PREFIX):
            plugin, field = key[len(_DEST_PREFIX) :].rsplit(":", 1)
            options.setdefault(plugin, {})[field] = value
    return options


def _value_parser(annotation: Any) -> Callable[[str], Any]:
    """An argparse `type` for a field: int/float/str as themselves, containers as JSON, and
    anything else as a string for pydantic to coerce."""
    annotation = _strip_optional(annotation)
    if annotation in (int, float, str):
        return annotation
    if typing.get_origin(annotation) in (list, dict, tuple, set) or annotation in (
        list,
        dict,
    ):
        return json.loads
    return str


def _literal_choices(annotation: Any) -> list[Any] | None:
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
