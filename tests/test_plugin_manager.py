"""The plugin manager (DESIGN.md §3): discovery through entry points, failure isolation,
allow/deny lists, selection errors, option validation and registration."""

from __future__ import annotations

import sys
from typing import ClassVar

import pydantic
import pytest
from fixtures.distributions import forget_modules, write_distribution
from pegboard.core.hookspecs import hookimpl
from pegboard.core.plugin_manager import (
    OptionsError,
    PluginError,
    PluginLoadFailed,
    PluginManager,
    UnknownPluginError,
)
from pegboard.sdk import MetricsExporter, SchedulePlan, Scheduler, StepBudget

BUDGET = StepBudget(max_batched_tokens=8, max_running_requests=4, max_model_len=64)

ACME = """
    import pydantic
    from pegboard.sdk import SchedulePlan, Scheduler

    class RoundRobinOptions(pydantic.BaseModel):
        quantum: int = pydantic.Field(4, ge=1, description="Tokens per turn.")
        fair: bool = True

    class RoundRobin(Scheduler):
        name = "round-robin"
        Options = RoundRobinOptions

        def schedule(self, waiting, running, budget, kv):
            return SchedulePlan()

    class Unnamed(Scheduler):
        def schedule(self, waiting, running, budget, kv):
            return SchedulePlan()

    class NotAPlugin:
        pass
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Fake installed distributions: `acme-plugins` (good, unnamed, not-a-plugin entry
    points), `acme-broken` (ImportError, SystemExit at import)."""
    root = tmp_path / "site"
    write_distribution(
        root,
        "acme-plugins",
        "2.0.1",
        {
            "pegboard.plugins": {
                "rr": "acme_plugins:RoundRobin",
                "unnamed": "acme_plugins:Unnamed",
                "notaplugin": "acme_plugins:NotAPlugin",
            }
        },
        {"acme_plugins": ACME},
    )
    write_distribution(
        root,
        "acme-broken",
        "0.0.1",
        {
            "pegboard.plugins": {
                "needs-cuda": "acme_broken:Thing",
                "quitter": "acme_quitter:Thing",
            }
        },
        {
            "acme_broken": "raise ImportError('libcuda.so.1: cannot open shared object file')\n",
            "acme_quitter": "import sys\nsys.exit(3)\n",
        },
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("PEGBOARD_PLUGINS", raising=False)
    monkeypatch.delenv("PEGBOARD_DISABLE_PLUGINS", raising=False)
    yield root
    forget_modules("acme_plugins", "acme_broken", "acme_quitter")


def by_name(manager: PluginManager) -> dict[str, object]:
    return {i.name: i for i in manager.catalog()}


# ---------------------------------------------------------------- discovery and isolation


def test_builtins_are_discovered_through_pegboards_own_entry_points(site):
    info = PluginManager().find("scheduler", "fcfs")
    assert (info.distribution, info.slot, info.state) == ("pegboard", "scheduler", "available")
    assert info.entry_point == "pegboard.plugins.scheduling.fcfs:FCFSScheduler"


def test_third_party_plugin_is_discovered_with_its_distribution(site):
    info = PluginManager().find("scheduler", "round-robin")
    assert (info.distribution, info.version) == ("acme-plugins", "2.0.1")
    assert info.cls.__module__ == "acme_plugins"


def test_a_class_without_a_name_takes_its_entry_point_name(site):
    info = PluginManager().find("scheduler", "unnamed")
    assert info.cls.name == "unnamed"
    assert Scheduler.name == ""  # the slot base was not touched


def test_broken_entry_points_are_listed_as_failed_and_the_rest_loads(site):
    catalog = by_name(PluginManager())
    assert catalog["needs-cuda"].state == (
        "failed: ImportError: libcuda.so.1: cannot open shared object file"
    )
    assert catalog["quitter"].state == "failed: SystemExit: 3"
    assert catalog["notaplugin"].state.startswith("failed: TypeError:")
    assert "not a pegboard plugin class" in catalog["notaplugin"].error
    assert catalog["round-robin"].state == "available"
    assert catalog["fcfs"].state == "available"


def test_catalog_is_sorted_by_slot_then_name_with_failed_last(site):
    catalog = PluginManager().catalog()
    loaded = [(i.slot, i.name) for i in catalog if i.slot]
    assert loaded == sorted(loaded)
    assert all(i.slot is None for i in catalog[len(loaded) :])


def test_entry_points_false_discovers_nothing(site):
    assert PluginManager(entry_points=False).catalog() == []


# ---------------------------------------------------------------- allow and deny lists


def test_denied_bare_name_is_not_even_imported(site, monkeypatch):
    monkeypatch.setenv("PEGBOARD_DISABLE_PLUGINS", "rr, needs-cuda")
    manager = PluginManager()
    assert "acme_broken" not in sys.modules
    assert by_name(manager)["needs-cuda"].state == "disabled"
    assert by_name(manager)["rr"].state == "disabled"
    with pytest.raises(PluginError, match="disabled: in PEGBOARD_DISABLE_PLUGINS"):
        manager.find("scheduler", "rr")


def test_denylist_accepts_slot_and_name(site):
    manager = PluginManager(deny=["scheduler:sjf", "sampler:round-robin"])
    assert by_name(manager)["sjf"].state == "disabled"
    assert by_name(manager)["round-robin"].state == "available"  # the slot did not match


def test_allowlist_limits_third_party_plugins_but_keeps_builtins(site, monkeypatch):
    monkeypatch.setenv("PEGBOARD_PLUGINS", "scheduler:rr")
    catalog = by_name(PluginManager())
    assert catalog["round-robin"].state == "available"
    assert catalog["needs-cuda"].state == "disabled"
    assert "acme_broken" not in sys.modules
    assert catalog["fcfs"].state == "available"


def test_denylist_can_turn_off_a_builtin(site):
    manager = PluginManager(deny=["fcfs"])
    with pytest.raises(PluginError, match="'fcfs' \\(pegboard 0.1.0\\) is disabled"):
        manager.create("scheduler", "fcfs")


# ---------------------------------------------------------------- selection errors


def test_unknown_name_lists_available_names_and_distributions(site):
    with pytest.raises(UnknownPluginError) as e:
        PluginManager().find("scheduler", "foo")
    message = str(e.value)
    assert message.startswith("unknown scheduler 'foo'; available: fcfs (pegboard 0.1.0), ")
    assert "round-robin (acme-plugins 2.0.1)" in message
    assert "failed to load: " in message and "needs-cuda (acme-broken 0.0.1)" in message


def test_selecting_a_broken_plugin_names_entry_point_distribution_and_error(site):
    with pytest.raises(PluginLoadFailed) as e:
        PluginManager().create("scheduler", "needs-cuda")
    message = str(e.value)
    assert "needs-cuda = acme_broken:Thing" in message
    assert "acme-broken 0.0.1" in message
    assert "ImportError: libcuda.so.1" in message


def test_two_distributions_with_one_name_are_both_listed_and_find_names_both(site, tmp_path):
    write_distribution(
        site,
        "other-rr",
        "1.0",
        {"pegboard.plugins": {"rr": "other_rr:RoundRobin"}},
        {"other_rr": ACME},
    )
    manager = PluginManager()
    assert [i.distribution for i in manager.catalog() if i.name == "round-robin"] == [
        "acme-plugins",
        "other-rr",
    ] or [i.distribution for i in manager.catalog() if i.name == "round-robin"] == [
        "other-rr",
        "acme-plugins",
    ]
    with pytest.raises(PluginError, match="several installed packages") as e:
        manager.find("scheduler", "round-robin")
    assert "acme-plugins 2.0.1" in str(e.value) and "other-rr 1.0" in str(e.value)
    forget_modules("other_rr")


def test_unknown_slot_is_an_error_listing_slots():
    with pytest.raises(PluginError, match="unknown slot 'schedular'; slots: scheduler"):
        PluginManager(entry_points=False).find("schedular", "x")


# ---------------------------------------------------------------- options


def test_create_validates_options_and_passes_them_to_the_plugin(site):
    plugin = PluginManager().create("scheduler", "round-robin", {"quantum": 7})
    assert plugin.options.quantum == 7 and plugin.options.fair is True


def test_bad_option_value_names_the_plugin_and_the_field(site):
    with pytest.raises(OptionsError) as e:
        PluginManager().validate_options("scheduler", "round-robin", {"quantum": 0})
    message = str(e.value)
    assert "round-robin (acme-plugins 2.0.1)" in message
    assert "quantum: Input should be greater than or equal to 1 (got 0)" in message


def test_unknown_option_is_rejected_even_if_the_model_would_ignore_it(site):
    with pytest.raises(OptionsError, match="quantom: unknown option.*its options: quantum, fair"):
        PluginManager().validate_options("scheduler", "round-robin", {"quantom": 3})


def test_options_schema_describes_each_field(site):
    schema = PluginManager().find("scheduler", "round-robin").options_schema()
    assert schema == [
        {
            "name": "quantum",
            "type": "int",
            "default": 4,
            "required": False,
            "description": "Tokens per turn.",
        },
        {"name": "fair", "type": "bool", "default": True, "required": False, "description": ""},
    ]


# ---------------------------------------------------------------- registration


class Fixed(Scheduler):
    """Overrides `schedule` without repeating `@hookimpl`: still the hook implementation."""

    name = "fixed"

    def schedule(self, waiting, running, budget, kv):
        return SchedulePlan(preempted=list(running))


class Other(Fixed):
    name = "other"


class TimingExporter(MetricsExporter):
    """A metrics plugin that also wraps the scheduler's hook (new-style wrapper)."""

    name = "timing"
    calls: ClassVar[list[str]] = []

    def export_metrics(self, snapshot):
        pass

    @hookimpl(wrapper=True)
    def schedule(self, waiting, running, budget, kv):
        plan = yield
        TimingExporter.calls.append(f"wrapped {len(plan.preempted)}")
        return plan


@pytest.fixture
def manager():
    m = PluginManager(entry_points=False)
    m.add(Fixed)
    m.add(Other)
    m.add(TimingExporter)
    return m


def test_an_undecorated_override_of_the_slot_hook_is_the_implementation(manager):
    manager.register(manager.create("scheduler", "fixed"))
    running = [object()]
    plan = manager.hook.schedule(waiting=[], running=running, budget=BUDGET, kv=None)
    assert plan.preempted == running


def test_a_plugin_may_wrap_another_slots_hook(manager):
    TimingExporter.calls.clear()
    manager.register(manager.create("scheduler", "fixed"))
    manager.register(manager.create("metrics", "timing"))
    manager.hook.schedule(waiting=[], running=[1, 2], budget=BUDGET, kv=None)
    assert TimingExporter.calls == ["wrapped 2"]


def test_a_single_choice_slot_holds_one_plugin(manager):
    first = manager.create("scheduler", "fixed")
    manager.register(first)
    with pytest.raises(PluginError, match="already has 'fixed' registered"):
        manager.register(manager.create("scheduler", "other"))
    manager.unregister(first)
    second = manager.create("scheduler", "other")
    manager.register(second)
    assert manager.active("scheduler") is second
    assert len(manager.hook.schedule.get_hookimpls()) == 1


def test_state_follows_registration(manager):
    plugin = manager.create("scheduler", "fixed")
    manager.register(plugin)
    assert manager.find("scheduler", "fixed").state == "active"
    assert manager.find("scheduler", "other").state == "available"
    manager.unregister(plugin)
    assert manager.find("scheduler", "fixed").state == "available"
    assert manager.active("scheduler") is None


def test_a_broadcast_slot_holds_many(manager):
    class Second(TimingExporter):
        name = "second"

    manager.add(Second)
    a, b = manager.create("metrics", "timing"), manager.create("metrics", "second")
    manager.register(a)
    manager.register(b)
    assert manager.active_all("metrics") == [a, b]


def test_add_under_another_name_does_not_rename_the_class(manager):
    info = manager.add(Fixed, name="fixed-too")
    assert Fixed.name == "fixed"
    assert manager.create("scheduler", "fixed-too").name == "fixed-too"
    assert manager.add(Fixed, name="fixed-too") is info


def test_add_refuses_a_taken_slot_and_name(manager):
    class Impostor(Scheduler):
        name = "fixed"

    with pytest.raises(PluginError, match="scheduler 'fixed' is already provided by fixed"):
        manager.add(Impostor)


def test_add_refuses_what_is_not_a_plugin(manager):
    with pytest.raises(TypeError, match="not a pegboard plugin class"):
        manager.add(dict)
    with pytest.raises(TypeError, match="slot base class"):
        manager.add(Scheduler)


def test_options_model_of_the_plugin_is_used(manager):
    class Knobs(pydantic.BaseModel):
        depth: int = 2

    class Knobbed(Fixed):
        name = "knobbed"
        Options = Knobs

    manager.add(Knobbed)
    assert manager.create("scheduler", "knobbed", {"depth": 5}).options.depth == 5
