"""Discovering, applying and reverting version-gated patches (DESIGN.md §4).

Nothing is applied by being installed: `apply_patches(names)` applies exactly the named
patches (from `--patch NAME` / `PEGBOARD_PATCHES`). For each, every gate — the class's
`requires` and each method's `@requires` — is checked before anything changes. A patch whose
class gate fails is skipped whole; a method whose gate fails is skipped alone; under
`strict=True` either is an error. Two patches replacing the same method is an error naming
both. `PatchReport.unapply()` restores the targets exactly (their `__dict__` as before).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from importlib_metadata import entry_points
from pegboard.sdk.patch import Patch, PatchError, gate_failures

log = logging.getLogger("pegboard.patches")

GROUP = "pegboard.patches"
ENV = "PEGBOARD_PATCHES"

#: (target class, attribute) -> name of the applied patch that owns it.
_owners: dict[tuple[type, str], str] = {}
#: Marks an attribute the target only inherited: unapplying deletes the patch's instead.
_INHERITED = object()


@dataclass
class PatchInfo:
    """A discovered patch as `pegboard plugins` lists it."""

    name: str
    distribution: str | None
    version: str | None
    entry_point: str
    cls: type[Patch] | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        """applied | available | gated out: reason | failed: error."""
        if self.error:
            return f"failed: {self.error}"
        if self.name in _owners.values():
            return "applied"
        reasons = gate_failures(self.cls.requires)
        return f"gated out: {'; '.join(reasons)}" if reasons else "available"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record for `pegboard plugins --json`."""
        return {
            "name": self.name,
            "target": _qualname(self.cls.target) if self.cls else None,
            "methods": sorted(self.cls.methods()) if self.cls else [],
            "requires": dict(self.cls.requires) if self.cls else {},
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "state": self.state,
        }


@dataclass
class PatchReport:
    """What `apply_patches` did: `applied` patch names, `skipped` patch (or `patch.method`)
    names with the reason each was gated out. `unapply()` reverts this report's patches."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _undo: list[tuple[type, str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary (the admin API's `patches`)."""
        return {"applied": list(self.applied), "skipped": dict(self.skipped)}

    def unapply(self) -> None:
        """Restore every attribute this report's patches replaced, newest first."""
        for target, attr, old in reversed(self._undo):
            if old is _INHERITED:
                delattr(target, attr)
            else:
                setattr(target, attr, old)
            _owners.pop((target, attr), None)
        self._undo.clear()
        self.applied.clear()


def discover_patches() -> dict[str, PatchInfo]:
    """Every entry point in `pegboard.patches`, each loaded in its own try."""
    found = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        info = PatchInfo(
            ep.name, dist.name if dist else None, dist.version if dist else None, ep.value
        )
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, Patch)):
                raise TypeError(f"{ep.value} is not a pegboard.sdk.Patch subclass")
            info.cls = obj
        except (Exception, SystemExit) as e:  # a broken patch package must not break listing
            info.error = f"{type(e).__name__}: {e}"
        found[ep.name] = info
    return found


def patches_from_env() -> list[str]:
    """The patch names in `PEGBOARD_PATCHES` (comma-separated)."""
    return [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]


def apply_patches(
    names: list[str] | list[type[Patch]],
    strict: bool = False,
    available: dict[str, PatchInfo] | None = None,
) -> PatchReport:
    """Apply the named patches (names from `pegboard.patches`, or Patch classes directly).

    Raises `PatchError` for an unknown or broken name, a conflict, a target lacking a patched
    attribute, or (with `strict`) a failed gate; then nothing of this call stays applied."""
    report = PatchReport()
    if not names:
        return report
    available = available if available is not None else discover_patches()
    try:
        for item in dict.fromkeys(names):  # naming a patch twice applies it once
            name, cls = _resolve(item, available)
            _apply_one(name, cls, strict, report)
    except Exception:
        report.unapply()
        raise
    return report


def check_patches(
    names: list[str] | list[type[Patch]],
    strict: bool = False,
    available: dict[str, PatchInfo] | None = None,
) -> dict[str, str]:
    """The start-up check of `serve` and `generate`, run before the model loads: every named
    patch exists and loads, and (with `strict`) passes its gates. Applies nothing.

    Returns what would be gated out (patch or `patch.method` -> reason); raises `PatchError`
    (one line: the CLI exits 2) for an unknown or broken patch or, with `strict`, a failed
    gate. `apply_patches` logs each gated-out patch when the engine starts."""
    if not names:
        return {}
    available = available if available is not None else discover_patches()
    gated: dict[str, str] = {}
    for item in dict.fromkeys(names):
        name, cls = _resolve(item, available)
        for what, gates in _gates(name, cls):
            reasons = gate_failures(gates)
            if reasons:
                if strict:
                    raise PatchError(_gated_message(what, "; ".join(reasons)))
                gated[what] = "; ".join(reasons)
                if what == name:
                    break  # the whole patch is out: its methods do not matter
    return gated


def _gates(name: str, cls: type[Patch]):
    """(name, gates) of the whole patch, then (`name.method`, gates) of each method."""
    yield name, cls.requires
    for attr, value in cls.methods().items():
        yield f"{name}.{attr}", _method_gates(value)


def _method_gates(value) -> dict[str, str]:
    fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    # @requires may sit above or below @staticmethod / @classmethod
    return getattr(value, "__pegboard_requires__", None) or getattr(fn, "__pegboard_requires__", {})


def _gated_message(what: str, reason: str) -> str:
    return f"patch {what} is gated out (--strict-patches): {reason}"


def _resolve(item: str | type[Patch], available: dict[str, PatchInfo]) -> tuple[str, type[Patch]]:
    if isinstance(item, type):
        return item.__name__, item
    info = available.get(item)
    if info is None:
        listing = ", ".join(sorted(available)) or "none installed"
        raise PatchError(f"unknown patch {item!r}; available: {listing}")
    if info.error:
        raise PatchError(
            f"patch {item!r} ({info.entry_point} from {info.distribution} {info.version}) "
            f"failed to load: {info.error}"
        )
    return item, info.cls


def _apply_one(name: str, cls: type[Patch], strict: bool, report: PatchReport) -> None:
    reasons = gate_failures(cls.requires)
    if reasons:
        _skip(report, name, "; ".join(reasons), strict)
        return
    methods = {}
    for attr, value in cls.methods().items():
        method_reasons = gate_failures(_method_gates(value))
        if method_reasons:
            _skip(report, f"{name}.{attr}", "; ".join(method_reasons), strict)
        else:
            methods[attr] = value
    target = cls.target
    for attr in methods:
        if not hasattr(target, attr):
            raise PatchError(
                f"patch {name!r} replaces {_qualname(target)}.{attr}, which does not exist "
                "(renamed in this version?)"
            )
        owner = _owners.get((target, attr))
        if owner is not None:
            raise PatchError(
                f"patches {owner!r} and {name!r} both replace {_qualname(target)}.{attr}"
            )
    for attr, value in methods.items():
        old = target.__dict__.get(attr, _INHERITED)
        cls._originals[attr] = old if old is not _INHERITED else getattr(target, attr)
        setattr(target, attr, value)
        _owners[(target, attr)] = name
        report._undo.append((target, attr, old))
    report.applied.append(name)


def _skip(report: PatchReport, what: str, reason: str, strict: bool) -> None:
    if strict:
        raise PatchError(_gated_message(what, reason))
    log.warning("patch %s is gated out, not applied: %s", what, reason)
    report.skipped[what] = reason


def _qualname(target: type) -> str:
    return f"{target.__module__}.{target.__qualname__}"
