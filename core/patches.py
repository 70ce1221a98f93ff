"""Discovering, applying and reverting version-gated patches (DESIGN.md §4).

Nothing is applied by being installed: `apply_patches(names)` applies exactly the named
patches (from `--patch NAME` / `PEGBOARD_PATCHES`). For each, every gate — the class's
`requires` and each method's `@requires` — is checked before anything changes. A patch whose
class gate fails is skipped whole; a method whose gate fails is skipped alone; under
`strict=True` either is an error. Two patches replacing the same method is an error naming
both. `PatchReport.unapply()` restores the targets exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from importlib_metadata import entry_points
from pegboard.sdk.patch import _MISSING, Patch, PatchError, gate_failures

GROUP = "pegboard.patches"
ENV = "PEGBOARD_PATCHES"

#: (target class, attribute) -> name of the applied patch that owns it.
_owners: dict[tuple[type, str], str] = {}


@dataclass
class PatchInfo:
    """A discovered patch as `pegboard plugins` lists it."""

    name: str
    distribution: str | None
    version: str | None
    cls: type[Patch] | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if any(owner == self.name for owner in _owners.values()):
            return "applied"
        reasons = gate_failures(self.cls.requires) if self.cls else []
        return f"gated out: {'; '.join(reasons)}" if reasons else "available"


@dataclass
class PatchReport:
    """What `apply_patches` did: applied patch names, skipped items with reasons."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _undo: list[tuple[type, str, Any]] = field(default_factory=list)

    def unapply(self) -> None:
        """Restore every attribute this report's patches replaced, newest first."""
        for target, attr, old in reversed(self._undo):
            if old is _MISSING:
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
            ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None
        )
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, Patch)):
                raise TypeError(f"{ep.value} is not a pegboard.sdk.Patch subclass")
            info.cls = obj
        except Exception as e:
            info.error = f"{type(e).__name__}: {e}"
        found[ep.name] = info
    return found


def patches_from_env() -> list[str]:
    return [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]


def apply_patches(
    names: list[str] | list[type[Patch]],
    strict: bool = False,
    available: dict[str, PatchInfo] | None = None,
) -> PatchReport:
    """Apply the named patches (names from `pegboard.patches`, or Patch classes directly).

    On any error nothing of this call stays applied."""
    report = PatchReport()
    if not names:
        return report
    available = available if available is not None else discover_patches()
    try:
        for item in names:
            name, cls = _resolve(item, available)
            _apply_one(name, cls, strict, report)
    except Exception:
        report.unapply()
        raise
    return report


def _resolve(item: str | type[Patch], available: dict[str, PatchInfo]) -> tuple[str, type[Patch]]:
    if isinstance(item, type):
        return item.__qualname__, item
    info = available.get(item)
    if info is None:
        listing = ", ".join(sorted(available)) or "none installed"
        raise PatchError(f"unknown patch {item!r}; available: {listing}")
    if info.error:
        raise PatchError(f"patch {item!r} from {info.distribution} failed to load: {info.error}")
    return item, info.cls


def _apply_one(name: str, cls: type[Patch], strict: bool, report: PatchReport) -> None:
    reasons = gate_failures(cls.requires)
    if reasons:
        _skip(report, name, "; ".join(reasons), strict)
        return
    methods = {}
    for attr, value in cls.methods().items():
        fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
        method_reasons = gate_failures(getattr(fn, "__pegboard_requires__", {}))
        if method_reasons:
            _skip(report, f"{name}.{attr}", "; ".join(method_reasons), strict)
        else:
            methods[attr] = value
    for attr in methods:
        owner = _owners.get((cls.target, attr))
        if owner is not None:
            raise PatchError(
                f"patches {owner!r} and {name!r} both replace {cls.target.__qualname__}.{attr}"
            )
    for attr, value in methods.items():
        old = cls.target.__dict__.get(attr, _MISSING)
        cls._originals[attr] = getattr(cls.target, attr, _MISSING) if old is _MISSING else old
        setattr(cls.target, attr, value)
        _owners[(cls.target, attr)] = name
        report._undo.append((cls.target, attr, old))
    report.applied.append(name)


def _skip(report: PatchReport, what: str, reason: str, strict: bool) -> None:
    if strict:
        raise PatchError(f"patch {what} is gated out (--strict-patches): {reason}")
    report.skipped[what] = reason
