"""Version-gated patches of core classes (DESIGN.md §4).

For changes a slot cannot express, a plugin package may replace methods of a core class:

    from pegboard.sdk import Patch, requires
    from pegboard.core.engine import Engine

    class QuietExport(Patch, target=Engine, requires={"pegboard": ">=0.1,<0.5"}):

        @requires(torch=">=2.5")                        # gates of one method
        def _export(self, snapshot):
            if snapshot.kind == "request":
                QuietExport.original("_export")(self, snapshot)

The whole patch's gates are a class keyword (`requires={...}`), so that the `@requires`
decorator stays usable in the class body (a class attribute `requires = {...}` also works for a
patch without gated methods, but it hides the decorator from the rest of the class body).

Every function (or static/class method, or property) defined in the class body replaces the
target's attribute of the same name, which must exist: a patch that names a method the target
no longer has fails loudly instead of adding dead code. `Patch.original(name)` is the target's
attribute as it was before this patch (for a method: the plain function, call it with `self`).
Gates map distribution names to `packaging` specifiers; they are checked with
importlib-metadata before anything is applied, and a missing distribution fails its gate.
Patches are published under the entry-point group `pegboard.patches` and applied only when
named (`--patch NAME`, `PEGBOARD_PATCHES`); see `pegboard.core.patches`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from importlib_metadata import PackageNotFoundError, version
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

_DESCRIPTORS = (staticmethod, classmethod, property)
#: Class-body names that configure the patch rather than replace something on the target.
_NOT_REPLACED = {"requires", "target", "_originals", "__init_subclass__", "__class_getitem__"}


class PatchError(Exception):
    """A patch cannot be applied (conflict, missing target, failed gate under strict mode)."""


def requires(**gates: str) -> Callable:
    """Gate one patch method on distribution versions: `@requires(torch=">=2.5")`.

    Keyword names are distribution names with `-` written as `_`."""

    def mark(fn: Callable) -> Callable:
        fn.__pegboard_requires__ = {k.replace("_", "-"): v for k, v in gates.items()}
        return fn

    return mark


def gate_failures(gates: dict[str, str]) -> list[str]:
    """Why `gates` are not met, one reason per failed gate (empty when all hold)."""
    reasons = []
    for dist, spec in gates.items():
        try:
            specifier = SpecifierSet(spec, prereleases=True)
        except InvalidSpecifier:
            reasons.append(f"{dist}: invalid specifier {spec!r}")
            continue
        try:
            installed = version(dist)
        except PackageNotFoundError:
            reasons.append(f"{dist} is not installed (needs {spec})")
            continue
        try:
            ok = Version(installed) in specifier
        except InvalidVersion:
            ok = False
        if not ok:
            reasons.append(f"{dist} {installed} does not satisfy {spec}")
    return reasons


class Patch:
    """Base of a version-gated patch; subclass with `class P(Patch, target=SomeClass)`.

    Class keywords (stored as class attributes): `target` (the patched class), `requires`
    (distribution -> specifier for the whole patch). Class methods: `methods()` (name ->
    replacement), `original(name)`.
    """

    target: ClassVar[type | None] = None
    requires: ClassVar[dict[str, str]] = {}
    _originals: ClassVar[dict[str, Any]]

    def __init_subclass__(
        cls, target: type | None = None, requires: dict[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if target is None:
            raise TypeError(f"patch {cls.__qualname__} names no target: class P(Patch, target=C)")
        cls.target = target
        cls._originals = {}
        if requires is not None:
            if "requires" in vars(cls):
                raise TypeError(
                    f"patch {cls.__qualname__} gives `requires` both as a class keyword and "
                    "as a class attribute"
                )
            cls.requires = dict(requires)
        if not isinstance(cls.requires, dict):
            raise TypeError(
                f"patch {cls.__qualname__}: `requires` is {type(cls.requires).__name__}, "
                "not a dict of distribution -> specifier"
            )

    @classmethod
    def methods(cls) -> dict[str, Any]:
        """The attributes this patch replaces on its target: every function, static/class
        method or property defined in the class body (dunders such as `__init__` included)."""
        return {
            name: value
            for name, value in vars(cls).items()
            if name not in _NOT_REPLACED
            and (inspect.isfunction(value) or isinstance(value, _DESCRIPTORS))
        }

    @classmethod
    def original(cls, name: str) -> Any:
        """The target's `name` as it was before this patch was applied (unbound for methods:
        call it with `self`)."""
        try:
            value = cls._originals[name]
        except KeyError:
            raise PatchError(
                f"{cls.__qualname__} has not replaced {name!r} (is it applied?)"
            ) from None
        return value
