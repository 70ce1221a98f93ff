"""Plugin discovery, selection and registration (DESIGN.md §3).

Every plugin — built-in or third-party — is a class published under the entry-point group
`pegboard.plugins`. `PluginManager` loads each entry point in its own `try`, so a broken
package is listed as failed (`pegboard plugins`) and breaks nothing unless it is selected.
Selecting a plugin (`create` + `register`) registers exactly that object's hook
implementations with pluggy; swapping unregisters it.

Environment (read when no explicit `allow` / `deny` is given; comma-separated names, `slot:name`
accepted too):
- `PEGBOARD_PLUGINS` — allowlist for third-party plugins; pegboard's own built-ins stay
  available (name one in `PEGBOARD_DISABLE_PLUGINS` to turn it off).
- `PEGBOARD_DISABLE_PLUGINS` — denylist. A bare name is not even imported; `slot:name` must
  import the entry point to learn its slot.
Names are entry-point names (by convention the plugin's name); a plugin whose class gives itself
another name also matches by that name once imported.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import importlib_metadata
import pluggy
import pydantic
from pegboard.core import hookspecs
from pegboard.sdk.slots import SLOTS, Plugin

ENTRY_POINT_GROUP = "pegboard.plugins"
ENV_ALLOW = "PEGBOARD_PLUGINS"
ENV_DENY = "PEGBOARD_DISABLE_PLUGINS"
#: The distribution whose entry points are the built-ins (exempt from the allowlist).
CORE_DISTRIBUTION = "pegboard"


class PluginError(Exception):
    """A plugin cannot be selected, created or registered; the message is user-facing."""


class UnknownPluginError(PluginError):
    """No plugin of that name in that slot; the message lists the available ones."""


class PluginLoadFailed(PluginError):
    """The selected plugin failed to load; the message names its entry point, its distribution
    and the original error."""


class OptionsError(PluginError):
    """A plugin's options did not validate; the message names the plugin and each bad field."""


@dataclass
class PluginInfo:
    """One discovered (or hand-added) plugin, as `pegboard plugins` lists it."""

    name: str
    slot: str | None
    distribution: str | None
    version: str | None
    entry_point: str  # "module:attr"
    cls: type[Plugin] | None  # None when loading failed
    error: str | None  # "ImportError: ..." when loading failed
    active: bool = False
    disabled: str | None = None  # why it was not loaded (allowlist / denylist)

    @property
    def state(self) -> str:
        if self.disabled:
            return "disabled"
        if self.error:
            return f"failed: {self.error}"
        if self.active:
            return "active"
        reason = self.unavailable
        return f"unavailable: {reason}" if reason else "available"

    @property
    def unavailable(self) -> str | None:
        """Why the plugin cannot run on this machine (`Plugin.unavailable`), or None."""
        if self.cls is None:
            return None
        try:
            return self.cls.unavailable()
        except Exception as e:  # a plugin's check must not break listing
            return f"its availability check raised {type(e).__name__}: {e}"

    @property
    def is_default(self) -> bool:
        """Whether the engine selects this plugin on this machine when none is named."""
        return self.slot is not None and self.name == slot_default(self.slot)

    @property
    def label(self) -> str:
        """`name (distribution version)`, as error messages name a plugin."""
        if self.distribution:
            return f"{self.name} ({self.distribution} {self.version})"
        return f"{self.name} ({self.entry_point})"

    def options_schema(self) -> list[dict[str, Any]]:
        """Name, type, default and description of each field of the plugin's `Options`."""
        if self.cls is None:
            return []
        return [
            {
                "name": name,
                "type": _type_name(field.annotation),
                "default": None if field.is_required() else _jsonable(field.get_default()),
                "required": field.is_required(),
                "description": field.description or "",
            }
            for name, field in self.cls.Options.model_fields.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (`pegboard plugins --json`, `GET /admin/plugins`)."""
        return {
            "name": self.name,
            "slot": self.slot,
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "state": self.state,
            "error": self.error,
            "default": self.is_default,
            "unavailable": self.unavailable,
            "handoff": self.cls.handoff if self.cls else None,
            "options": self.options_schema(),
        }


class _HookManager(pluggy.PluginManager):
    """pluggy's manager, plus: a `Plugin`'s method named after its slot's hook is a hook
    implementation even when a subclass overrode it without re-applying `@hookimpl`."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not isinstance(plugin, Plugin):
            return opts
        spec = SLOTS.get(plugin.slot)
        if spec is None or name != spec.hook:
            return None
        static = inspect.getattr_static(plugin, name, None)
        if isinstance(static, (types.FunctionType, types.MethodType, staticmethod, classmethod)):
            return {}  # pluggy fills in the defaults
        return None


class PluginManager:
    """Discovers plugins through entry points and registers the selected instances with pluggy.

    `allow` / `deny` default to the environment variables `PEGBOARD_PLUGINS` /
    `PEGBOARD_DISABLE_PLUGINS`. `entry_points=False` discovers nothing (plugins are then
    only those given to `add`).
    """

    def __init__(
        self,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
        entry_points: bool = True,
    ) -> None:
        self.pm = _HookManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hook = self.pm.hook
        self._allow = _Filter(allow, ENV_ALLOW)
        self._deny = _Filter(deny, ENV_DENY)
        self._infos: list[PluginInfo] = []
        self._added: dict[tuple[type[Plugin], str], PluginInfo] = {}
        self._registered: dict[str, list[Plugin]] = {slot: [] for slot in SLOTS}
        if entry_points:
            for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._infos.append(self._load(ep))

    # ---------------------------------------------------------------- discovery

    def _load(self, ep: importlib_metadata.EntryPoint) -> PluginInfo:
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            slot=None,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
            entry_point=ep.value,
            cls=None,
            error=None,
        )
        builtin = info.distribution == CORE_DISTRIBUTION
        if self._allow.active and not builtin and not self._allow.mentions(ep.name):
            info.disabled = f"not in {self._allow.source}"
            return info
        if self._deny.names_bare(ep.name):
            info.disabled = f"in {self._deny.source}"
            return info
        try:
            info.cls = _check_plugin_class(ep.load())
            if not info.cls.__dict__.get("name"):
                info.cls.name = (
                    ep.name
                )  # the class names itself nothing: it takes the entry point's
        except (Exception, SystemExit) as e:  # a plugin's import must never take the engine down
            info.error = f"{type(e).__name__}: {e}"
            return info
        info.name, info.slot = info.cls.name, info.cls.slot
        names = (info.name, ep.name)
        if self._deny.matches(info.slot, *names):
            info.disabled = f"in {self._deny.source}"
        elif self._allow.active and not builtin and not self._allow.matches(info.slot, *names):
            info.disabled = f"not in {self._allow.source}"
        return info

    def add(
        self, cls: type[Plugin], name: str | None = None, distribution: str | None = None
    ) -> PluginInfo:
        """Make a plugin class selectable without an entry point (embedders, tests).

        `name` defaults to the class's `name`. Adding the same class again returns its
        existing record; another class under a taken (slot, name) is an error.
        """
        original = _check_plugin_class(cls)
        name = name or original.name
        if not name:
            raise PluginError(f"{original.__qualname__} has no name; pass add(cls, name=...)")
        existing = self._added.get((original, name))
        if existing is not None:
            return existing
        cls = original
        if cls.name != name:
            # Never rename the caller's class: the alias is a subclass carrying the new name.
            cls = type(cls.__name__, (cls,), {"name": name, "__module__": cls.__module__})
        for info in self._infos:
            if info.cls is not None and (info.slot, info.name) == (cls.slot, cls.name):
                raise PluginError(f"{cls.slot} {cls.name!r} is already provided by {info.label}")
        version = None
        if distribution:
            try:
                version = importlib_metadata.version(distribution)
            except importlib_metadata.PackageNotFoundError:
                version = None
        info = PluginInfo(
            name=cls.name,
            slot=cls.slot,
            distribution=distribution,
            version=version,
            entry_point=f"{cls.__module__}:{cls.__qualname__}",
            cls=cls,
            error=None,
        )
        self._infos.append(info)
        self._added[(original, name)] = info
        return info

    def catalog(self) -> list[PluginInfo]:
        """Every discovered plugin, failed and disabled ones included, sorted by slot then
        name (those whose slot is unknown last)."""
        return sorted(self._infos, key=lambda i: (i.slot is None, i.slot or "", i.name))

    def list_plugins(self) -> list[PluginInfo]:
        """Same as `catalog` (the name the admin API uses)."""
        return self.catalog()

    # ---------------------------------------------------------------- selection

    def find(self, slot: str, name: str) -> PluginInfo:
        """The plugin `name` of `slot`.

        Raises `UnknownPluginError` (listing what is available), `PluginLoadFailed` when the
        entry point of that name failed to import, or `PluginError` when it is disabled or two
        distributions provide it.
        """
        _check_slot(slot)
        loaded = [i for i in self._infos if i.cls is not None and not i.disabled]
        found = [i for i in loaded if (i.slot, i.name) == (slot, name)]
        if len(found) == 1:
            return found[0]
        if found:
            providers = " and ".join(i.label for i in found)
            raise PluginError(
                f"{slot} {name!r} is provided by several installed packages: {providers}; "
                f"uninstall one, or disable one with {ENV_DENY}"
            )
        for info in self._infos:
            if info.name == name and info.slot in (slot, None) and info.error:
                raise PluginLoadFailed(
                    f"{slot} {name!r} failed to load: entry point "
                    f"'{info.name} = {info.entry_point}' of {_dist_label(info)}: {info.error}"
                )
        for info in self._infos:
            if info.name == name and info.slot in (slot, None) and info.disabled:
                raise PluginError(
                    f"{slot} {name!r} ({_dist_label(info)}) is disabled: {info.disabled}"
                )
        available = sorted((i for i in loaded if i.slot == slot), key=lambda i: i.name)
        message = f"unknown {slot} {name!r}; available: "
        message += ", ".join(i.label for i in available) or "none"
        failed = [i for i in self._infos if i.error and i.slot in (slot, None)]
        if failed:
            message += "; failed to load: " + ", ".join(i.label for i in failed)
        raise UnknownPluginError(message)

    def validate_options(
        self, slot: str, name: str, options: dict[str, Any] | pydantic.BaseModel | None
    ) -> pydantic.BaseModel:
        """Validate `options` with the plugin's `Options` model; unknown fields are errors."""
        info = self.find(slot, name)
        model = info.cls.Options
        if isinstance(options, model):
            return options
        if isinstance(options, pydantic.BaseModel):
            options = options.model_dump()
        options = dict(options or {})
        known = {n for n, f in model.model_fields.items()} | {
            f.alias for f in model.model_fields.values() if f.alias
        }
        problems = [f"{key}: unknown option" for key in options if key not in known]
        try:
            validated = model.model_validate(options)
        except pydantic.ValidationError as e:
            problems += [_describe(err) for err in e.errors() if err["type"] != "extra_forbidden"]
            validated = None
        if problems:
            fields = ", ".join(model.model_fields) or "none"
            raise OptionsError(
                f"invalid options for {slot} {info.label}: "
                + "; ".join(problems)
                + f" (its options: {fields})"
            )
        return validated

    def create(
        self, slot: str, name: str, options: dict[str, Any] | pydantic.BaseModel | None = None
    ) -> Plugin:
        """Find the plugin, validate its options and instantiate it (`setup` is the caller's)."""
        info = self.find(slot, name)
        validated = self.validate_options(slot, name, options)
        try:
            return info.cls(validated)
        except Exception as e:
            raise PluginError(
                f"creating {slot} {info.label} failed: {type(e).__name__}: {e}"
            ) from e

    # ---------------------------------------------------------------- registration

    def register(self, plugin: Plugin) -> None:
        """Register the instance's hook implementations. A single-choice slot holds one."""
        slot = _check_slot(getattr(plugin, "slot", None))
        current = self._registered[slot]
        if any(p is plugin for p in current):
            raise PluginError(f"{slot} {plugin.name!r} is already registered")
        if current and not SLOTS[slot].multi:
            raise PluginError(
                f"slot {slot!r} already has {current[0].name!r} registered; "
                "unregister it first (a single-choice slot holds one plugin)"
            )
        try:
            self.pm.register(plugin, name=f"{slot}:{plugin.name}:{id(plugin)}")
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(f"cannot register {slot} {plugin.name!r}: {e}") from e
        current.append(plugin)
        self._mark(plugin)

    def unregister(self, plugin: Plugin) -> None:
        """Remove the instance's hook implementations (no-op if it is not registered)."""
        current = self._registered.get(getattr(plugin, "slot", None), [])
        if not any(p is plugin for p in current):
            return
        self.pm.unregister(plugin)
        current[:] = [p for p in current if p is not plugin]
        self._mark(plugin)

    def active(self, slot: str) -> Plugin | None:
        """The registered plugin of a single-choice slot, or None."""
        current = self._registered[_check_slot(slot)]
        return current[0] if current else None

    def active_all(self, slot: str) -> list[Plugin]:
        """Every registered plugin of `slot`, in registration order (e.g. metrics exporters)."""
        return list(self._registered[_check_slot(slot)])

    def info_of(self, plugin: Plugin) -> PluginInfo | None:
        """The catalog record of a plugin instance (None for one never discovered or added)."""
        for info in self._infos:
            if info.cls is type(plugin) or (
                info.cls is not None
                and isinstance(plugin, info.cls)
                and (info.slot, info.name) == (plugin.slot, plugin.name)
            ):
                return info
        return None

    def describe(self, plugin: Plugin) -> str:
        """How errors name a plugin: `scheduler 'lifo' (pegboard-lifo 0.1)`."""
        slot, name = getattr(plugin, "slot", "?"), getattr(plugin, "name", "?")
        info = self.info_of(plugin) if isinstance(plugin, Plugin) else None
        if info is None:
            where = f"{type(plugin).__module__}:{type(plugin).__qualname__}"
        else:
            where = _dist_label(info) if info.distribution else info.entry_point
        return f"{slot} {name!r} ({where})"

    def _mark(self, plugin: Plugin) -> None:
        for info in self._infos:
            if info.cls is not None and isinstance(plugin, info.cls):
                if (info.slot, info.name) == (plugin.slot, plugin.name):
                    info.active = any(
                        type(p) is type(plugin) and p.name == plugin.name
                        for p in self._registered[plugin.slot]
                    )


class _Filter:
    """An allow- or denylist of `name` / `slot:name` entries. Before import only the entry
    point's name is known; after import the plugin's slot and own name match too."""

    def __init__(self, names: Iterable[str] | None, env: str) -> None:
        self.source = "the given list" if names is not None else env
        if names is None:
            raw = os.environ.get(env) or None  # set but empty means unset
            names = raw.split(",") if raw is not None else None
        self.active = names is not None
        self.entries = {n.strip() for n in names or [] if n.strip()}

    def names_bare(self, name: str) -> bool:
        return name in self.entries

    def mentions(self, name: str) -> bool:
        """Whether `name` appears, bare or as the name part of `slot:name`."""
        return any(e == name or e.endswith(f":{name}") for e in self.entries)

    def matches(self, slot: str, *names: str) -> bool:
        return any(n in self.entries or f"{slot}:{n}" in self.entries for n in names)


def slot_default(slot: str) -> str | None:
    """The plugin a slot uses on this machine when none is named: the slot's default, except
    attention on a CUDA machine (the engine's GPU default, see `Engine._default`)."""
    spec = SLOTS.get(slot)
    if spec is None:
        return None
    if slot == "attention":
        import torch

        if torch.cuda.is_available():
            from pegboard.core.engine import GPU_DEFAULT_ATTENTION

            return GPU_DEFAULT_ATTENTION
    return spec.default


def _check_plugin_class(obj: object) -> type[Plugin]:
    """The loaded object as a plugin class, or a TypeError saying what is wrong with it."""
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise TypeError(f"{obj!r} is not a pegboard plugin class (a subclass of a slot base)")
    bases = {spec.base for spec in SLOTS.values()} | {Plugin}
    if obj in bases:
        raise TypeError(f"{obj.__name__} is a slot base class, not a plugin")
    if obj.slot not in SLOTS:
        raise TypeError(
            f"{obj.__name__} fills no slot (slot {obj.slot!r}); subclass one of "
            + ", ".join(s.base.__name__ for s in SLOTS.values())
        )
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, pydantic.BaseModel)):
        raise TypeError(f"{obj.__name__}.Options is not a pydantic model")
    return obj


def _check_slot(slot: str | None) -> str:
    if slot not in SLOTS:
        raise PluginError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
    return slot


def _dist_label(info: PluginInfo) -> str:
    if info.distribution:
        return f"{info.distribution} {info.version}"
    return "no installed distribution"


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in err["loc"]) or "options"
    got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
    return f"{where}: {err['msg']}{got}"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
