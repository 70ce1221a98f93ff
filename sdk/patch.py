"""Version-gated patches of core classes (DESIGN.md §4). Being written for issue 2."""


class PatchError(Exception):
    """A patch could not be applied (conflict, missing target) — the message names the patch."""


class Patch:
    """Base of a version-gated patch: `class Fair(Patch, target=Scheduler): ...`."""


def requires(**gates: str):
    """Declare version gates on a patch method: `@requires(torch=">=2.5")`."""

    def mark(fn):
        fn.__pegboard_requires__ = gates
        return fn

    return mark
