"""Version-gated patches (DESIGN.md §4): gates checked before anything changes, explicit
activation only, conflicts named, originals reachable, unapply restores the target exactly."""

from __future__ import annotations

import pytest
from fixtures.distributions import forget_modules, write_distribution
from pegboard.core.patches import (
    PatchReport,
    apply_patches,
    discover_patches,
    patches_from_env,
)
from pegboard.sdk import Patch, PatchError, requires


class Greeter:
    """A stand-in core class."""

    greeting = "hello"

    def greet(self, who: str) -> str:
        return f"{self.greeting} {who}"

    def wave(self) -> str:
        return "wave"


class Polite(Greeter):
    """Inherits `greet`; a patch on it must not touch `Greeter`."""


class Loud(Patch, target=Greeter):
    requires = {"pegboard": ">=0.1,<0.5"}

    def greet(self, who: str) -> str:
        return Loud.original("greet")(self, who).upper()


class FromTheFuture(Patch, target=Greeter):
    requires = {"torch": ">=99"}

    def greet(self, who: str) -> str:
        return "future"


class HalfGated(Patch, target=Greeter):
    @requires(torch=">=99")
    def greet(self, who: str) -> str:
        return "gated"

    @requires(torch=">=2.0")
    def wave(self) -> str:
        return "WAVE"


@pytest.fixture
def undo():
    reports: list[PatchReport] = []
    yield reports.append
    for r in reversed(reports):
        r.unapply()


def test_satisfied_patch_replaces_the_method_and_reaches_the_original(undo):
    before = dict(vars(Greeter))
    report = apply_patches([Loud])
    undo(report)
    assert report.applied == ["Loud"] and report.skipped == {}
    assert Greeter().greet("ann") == "HELLO ANN"
    report.unapply()
    assert Greeter().greet("ann") == "hello ann"
    assert dict(vars(Greeter)) == before


def test_class_gate_not_met_skips_the_whole_patch_with_its_reason(undo):
    report = apply_patches([FromTheFuture])
    undo(report)
    assert report.applied == []
    assert "torch" in report.skipped["FromTheFuture"]
    assert ">=99" in report.skipped["FromTheFuture"]
    assert Greeter().greet("x") == "hello x"


def test_missing_distribution_fails_the_gate(undo):
    class NeedsNothingInstalled(Patch, target=Greeter):
        requires = {"no-such-distribution-xyz": ">=1"}

        def wave(self) -> str:
            return "no"

    report = apply_patches([NeedsNothingInstalled])
    undo(report)
    assert "not installed" in report.skipped["NeedsNothingInstalled"]
    assert Greeter().wave() == "wave"


def test_method_gate_skips_only_that_method(undo):
    report = apply_patches([HalfGated])
    undo(report)
    assert report.applied == ["HalfGated"]
    assert list(report.skipped) == ["HalfGated.greet"]
    assert Greeter().greet("x") == "hello x"
    assert Greeter().wave() == "WAVE"


@pytest.mark.parametrize("patch", [FromTheFuture, HalfGated])
def test_strict_makes_a_gated_out_patch_an_error_and_applies_nothing(patch):
    before = dict(vars(Greeter))
    with pytest.raises(PatchError, match="gated out"):
        apply_patches([patch], strict=True)
    assert dict(vars(Greeter)) == before


def test_two_patches_on_one_method_is_an_error_naming_both(undo):
    class Quiet(Patch, target=Greeter):
        def greet(self, who: str) -> str:
            return "..."

    before = dict(vars(Greeter))
    with pytest.raises(PatchError, match="'Loud' and 'Quiet' both replace .*Greeter.greet"):
        apply_patches([Loud, Quiet])
    assert dict(vars(Greeter)) == before  # the first one was rolled back too


def test_conflict_is_detected_across_separate_calls(undo):
    class Quiet(Patch, target=Greeter):
        def greet(self, who: str) -> str:
            return "..."

    undo(apply_patches([Loud]))
    with pytest.raises(PatchError, match="both replace"):
        apply_patches([Quiet])
    assert Greeter().greet("a") == "HELLO A"


def test_patching_an_inherited_method_is_undone_by_deleting_it(undo):
    class PoliteGreet(Patch, target=Polite):
        def greet(self, who: str) -> str:
            return "dear " + PoliteGreet.original("greet")(self, who)

    before = dict(vars(Polite))
    report = apply_patches([PoliteGreet])
    assert Polite().greet("bo") == "dear hello bo"
    assert Greeter().greet("bo") == "hello bo"
    report.unapply()
    assert dict(vars(Polite)) == before
    assert Polite().greet("bo") == "hello bo"


def test_a_method_the_target_lacks_is_an_error_not_a_new_attribute():
    class Typo(Patch, target=Greeter):
        def gret(self) -> str:
            return "oops"

    with pytest.raises(PatchError, match="Greeter.gret, which does not exist"):
        apply_patches([Typo])
    assert not hasattr(Greeter, "gret")


def test_original_of_an_unapplied_patch_is_an_error():
    class Never(Patch, target=Greeter):
        def wave(self) -> str:
            return "never"

    with pytest.raises(PatchError, match="not replaced 'wave'"):
        Never.original("wave")


def test_a_patch_must_name_a_target():
    with pytest.raises(TypeError, match="names no target"):

        class Aimless(Patch):
            pass


def test_report_is_json_ready(undo):
    report = apply_patches([Loud, FromTheFuture])
    undo(report)
    assert report.report() == {
        "applied": ["Loud"],
        "skipped": {"FromTheFuture": report.skipped["FromTheFuture"]},
    }


def test_patches_from_env_reads_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("PEGBOARD_PATCHES", "fair, quiet,,")
    assert patches_from_env() == ["fair", "quiet"]
    monkeypatch.delenv("PEGBOARD_PATCHES")
    assert patches_from_env() == []


# ---------------------------------------------------------------- entry points


@pytest.fixture
def patch_dist(tmp_path, monkeypatch):
    """A distribution publishing three patches: usable, gated out, and broken."""
    root = write_distribution(
        tmp_path / "site",
        "pegboard-greeter-patches",
        "1.2.0",
        {
            "pegboard.patches": {
                "shout": "greeter_patches:Shout",
                "future": "greeter_patches:Future",
                "broken": "greeter_broken:Nothing",
            }
        },
        {
            "greeter_patches": f"""
                from pegboard.sdk import Patch
                from {__name__} import Greeter

                class Shout(Patch, target=Greeter):
                    def greet(self, who):
                        return "SHOUT"

                class Future(Patch, target=Greeter):
                    requires = {{"pegboard": ">=9"}}
                    def wave(self):
                        return "never"
            """,
            "greeter_broken": "raise ImportError('needs a GPU driver')\n",
        },
    )
    monkeypatch.syspath_prepend(str(root))
    yield
    forget_modules("greeter_patches", "greeter_broken")


def test_installed_patches_are_discovered_but_nothing_is_applied(patch_dist):
    found = discover_patches()
    assert found["shout"].state == "available"
    assert found["shout"].distribution == "pegboard-greeter-patches"
    assert found["future"].state.startswith("gated out: pegboard 0.1.0")
    assert found["broken"].state == "failed: ImportError: needs a GPU driver"
    assert Greeter().greet("x") == "hello x"


def test_a_named_installed_patch_is_applied_and_listed_as_applied(patch_dist, undo):
    report = apply_patches(["shout"])
    undo(report)
    assert Greeter().greet("x") == "SHOUT"
    assert discover_patches()["shout"].state == "applied"


def test_unknown_patch_name_lists_the_available_ones(patch_dist):
    with pytest.raises(PatchError, match="unknown patch 'shuot'; available: broken, future, shout"):
        apply_patches(["shuot"])


def test_selecting_a_broken_patch_names_its_package_and_error(patch_dist):
    with pytest.raises(PatchError, match="pegboard-greeter-patches 1.2.0.*needs a GPU driver"):
        apply_patches(["broken"])
