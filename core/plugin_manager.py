"""Plugin discovery, isolation and selection (DESIGN.md §3).

Plugins are classes published under the entry-point group `pegboard.plugins` — pegboard's own
built-ins exactly like a third party's. Each entry point is loaded in its own `try`: a broken
package is listed as failed with its error and only becomes an error if someone selects it.
Selecting a plugin instantiates its class with validated options and registers that object
with pluggy; a single-choice slot holds one registered object at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
import pydantic
from importlib_metadata import EntryPoint, entry_points
from pegboard.core import hookspecs
from pegboard.sdk.slots import SLOTS, Plugin

GROUP = "pegboard.plugins"
ALLOW_ENV = "PEGBOARD_PLUGINS"
DENY_ENV = "PEGBOARD_DISABLE_PLUGINS"


class PluginError(Exception):
    """A plugin cannot be selected or used; the message says why and what to do."""


class UnknownPluginError(PluginError):
    """No plugin of that name in that slot; the message lists the available ones."""


class PluginLoadFailed(PluginError):
    """The selected plugin's entry point failed to load."""


class OptionsError(PluginError):
    """A plugin's options failed validation; the message names each bad field."""


@dataclass
class PluginInfo:
    """One discovered plugin (or a failed entry point) as `pegboard plugins` lists it."""

    name: str
    slot: str | None
    distribution: str | None
    version: str | None
    entry_point: str
    cls: type[Plugin] | None = None
    error: str | None = None
    active: bool = False
    disabled: bool = False

    @property
    def state(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.disabled:
            return "disabled"
        return "active" if self.active else "available"

    @property
    def source(self) -> str:
        return f"{self.distribution or '?'} {self.version or ''}".strip()

    def options_schema(self) -> list[dict[str, Any]]:
        if self.cls is None:
            return []
        rows = []
        for field, spec in self.cls.Options.model_fields.items():
            rows.append(
                {
                    "name": field,
                    "type": _type_name(spec.annotation),
                    "default": None
                    if spec.is_required()
                    else spec.get_default(call_default_factory=True),
                    "required": spec.is_required(),
                    "description": spec.description or "",
                }
            )
        return rows


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class _HookManager(pluggy.PluginManager):
    """Treats a plugin's method named like its slot's hook as an implementation even when a
    subclass overrode the base's `@hookimpl` method without repeating the marker."""

    def parse_hookimpl_opts(self, plugin: object, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and isinstance(plugin, Plugin):
            spec = SLOTS.get(plugin.slot)
            if spec is not None and name == spec.hook:
                return {}
        return opts


class PluginManager:
    """Discovers plugins, validates selections and holds the pluggy manager.

    `allow` / `deny` are plugin names (or `slot:name`); None reads `PEGBOARD_PLUGINS` /
    `PEGBOARD_DISABLE_PLUGINS` (comma-separated). A plugin outside the allowlist or on the
    denylist is not imported at all.
    """

    def __init__(
        self,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
        entry_points: bool = True,
    ) -> None:
        self.allow = _names(allow, ALLOW_ENV)
        self.deny = _names(deny, DENY_ENV)
        self.pm = _HookManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: list[PluginInfo] = []
        self._active: dict[str, list[Plugin]] = {slot: [] for slot in SLOTS}
        if entry_points:
            self.discover()

    @property
    def hook(self):
        return self.pm.hook

    # ---------------------------------------------------------------- discovery

    def discover(self) -> None:
        for ep in entry_points(group=GROUP):
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                slot=None,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
                entry_point=ep.value,
            )
            if not self._wanted(ep.name, None):
                info.disabled = True
                self._infos.append(info)
                continue
            self._load(ep, info)
            if info.slot and not self._wanted(info.name, info.slot):
                info.disabled = True
            self._infos.append(info)

    def _load(self, ep: EntryPoint, info: PluginInfo) -> None:
        try:
            obj = ep.load()
        except BaseException as e:  # a plugin's import may raise anything, even SystemExit
            if isinstance(e, KeyboardInterrupt):
                raise
            info.error = f"{type(e).__name__}: {e}"
            return
        problem = _check_class(obj)
        if problem:
            info.error = problem
            return
        if "name" not in vars(obj) or not obj.name:
            obj.name = ep.name
        info.cls, info.name, info.slot = obj, obj.name, obj.slot

    def _wanted(self, name: str, slot: str | None) -> bool:
        keys = {name} | ({f"{slot}:{name}"} if slot else set())
        if self.deny & keys:
            return False
        if (
            self.allow
            and not (self.allow & keys)
            and not (slot is None and _slot_allowed(self.allow, name))
        ):
            return False
        return True

    def add(
        self, cls: type[Plugin], name: str | None = None, distribution: str | None = None
    ) -> PluginInfo:
        """Make a plugin class selectable without an entry point (embedders, tests)."""
        problem = _check_class(cls)
        if problem:
            raise PluginError(problem)
        name = name or cls.name
        if not name:
            raise PluginError(f"{cls.__qualname__} has no name; pass name=")
        if "name" not in vars(cls) or cls.name != name:
            cls = type(cls.__name__, (cls,), {"name": name, "__module__": cls.__module__})
        info = PluginInfo(
            name, cls.slot, distribution, None, f"{cls.__module__}:{cls.__qualname__}", cls
        )
        self._infos.append(info)
        return info

    # ---------------------------------------------------------------- selection

    def catalog(self) -> list[PluginInfo]:
        return sorted(self._infos, key=lambda i: (i.slot or "~", i.name))

    def find(self, slot: str, name: str) -> PluginInfo:
        if slot not in SLOTS:
            raise PluginError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
        matches = [i for i in self._infos if i.name == name and i.slot in (slot, None)]
        loaded = [i for i in matches if i.slot == slot and not i.disabled]
        if len(loaded) > 1:
            sources = ", ".join(i.source for i in loaded)
            raise PluginError(f"{slot} plugin {name!r} is provided by several packages: {sources}")
        if loaded:
            return loaded[0]
        failed = [i for i in matches if i.error]
        if failed:
            i = failed[0]
            raise PluginLoadFailed(
                f"{slot} plugin {name!r} (entry point {i.entry_point!r} from {i.source}) "
                f"failed to load: {i.error}"
            )
        disabled = [i for i in matches if i.disabled]
        if disabled:
            raise PluginError(
                f"{slot} plugin {name!r} is disabled by {ALLOW_ENV}/{DENY_ENV} "
                f"(from {disabled[0].source})"
            )
        available = [i for i in self._infos if i.slot == slot and not i.disabled and not i.error]
        listing = ", ".join(f"{i.name} ({i.source})" for i in available) or "none"
        raise UnknownPluginError(f"unknown {slot} plugin {name!r}; available: {listing}")

    def validate_options(
        self, slot: str, name: str, options: dict[str, Any] | None
    ) -> pydantic.BaseModel:
        cls = self.find(slot, name).cls
        try:
            return cls.Options.model_validate(options or {})
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(options)'}: {err['msg']}"
                for err in e.errors()
            )
            raise OptionsError(f"bad options for {slot} plugin {name!r}: {problems}") from None

    def create(self, slot: str, name: str, options: dict[str, Any] | None = None) -> Plugin:
        """A new, not yet set up instance of the named plugin with validated options."""
        cls = self.find(slot, name).cls
        validated = self.validate_options(slot, name, options)
        try:
            return cls(validated)
        except Exception as e:
            raise PluginError(
                f"{slot} plugin {name!r} failed to start: {type(e).__name__}: {e}"
            ) from e

    def register(self, plugin: Plugin) -> None:
        spec = SLOTS[plugin.slot]
        current = self._active[plugin.slot]
        if current and not spec.multi:
            raise PluginError(
                f"slot {plugin.slot!r} already has {current[0].name!r}; unregister it first"
            )
        self.pm.register(plugin, name=f"{plugin.slot}:{plugin.name}:{id(plugin)}")
        current.append(plugin)
        self._mark(plugin, True)

    def unregister(self, plugin: Plugin) -> None:
        self.pm.unregister(plugin)
        self._active[plugin.slot].remove(plugin)
        if not any(p.name == plugin.name for p in self._active[plugin.slot]):
            self._mark(plugin, False)

    def active(self, slot: str) -> Plugin | None:
        plugins = self._active[slot]
        return plugins[0] if plugins else None

    def active_all(self, slot: str) -> list[Plugin]:
        return list(self._active[slot])

    def _mark(self, plugin: Plugin, active: bool) -> None:
        for info in self._infos:
            if info.slot == plugin.slot and info.name == plugin.name:
                info.active = active


def _check_class(obj: object) -> str | None:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        return f"entry point does not name a pegboard.sdk plugin class (got {obj!r})"
    if obj.slot not in SLOTS:
        return f"{obj.__qualname__} does not derive from a slot base class (slot {obj.slot!r})"
    return None


def _names(given: Iterable[str] | None, env: str) -> set[str]:
    if given is None:
        given = os.environ.get(env, "").split(",")
    return {n.strip() for n in given if n.strip()}


def _slot_allowed(allow: set[str], name: str) -> bool:
    # "slot:name" entries are checked once the class (and so its slot) is known.
    return any(a.endswith(f":{name}") for a in allow)
