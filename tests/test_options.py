"""CLI flags generated from plugin option models (DESIGN.md §3, Options)."""

from __future__ import annotations

import argparse
from typing import Literal

import pydantic
import pytest
from pegboard.core import options
from pegboard.core.options import add_plugin_arguments, collect_plugin_options
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk import MetricsExporter, SchedulePlan, Scheduler


class RadixOptions(pydantic.BaseModel):
    max_tokens: int = pydantic.Field(4096, description="Tokens kept for reuse.")
    eviction: Literal["lru", "lfu"] = "lru"
    warm: bool = False
    buckets: list[int] = pydantic.Field(default_factory=lambda: [1, 2])
    ratio: float | None = None


class Radixish(Scheduler):
    name = "radix_like"
    Options = RadixOptions

    def schedule(self, waiting, running, budget, kv):
        return SchedulePlan()


class Chatty(MetricsExporter):
    name = "chatty"

    def export_metrics(self, snapshot):
        pass


def manager_with(*classes) -> PluginManager:
    m = PluginManager(entry_points=False)
    for cls in classes:
        m.add(cls)
    return m


def parse(manager: PluginManager, argv: list[str], parser=None) -> argparse.Namespace:
    parser = parser or argparse.ArgumentParser()
    add_plugin_arguments(parser, manager)
    return parser.parse_args(argv)


def test_only_flags_the_user_gave_are_collected():
    m = manager_with(Radixish)
    assert collect_plugin_options(parse(m, []), m) == {}
    args = parse(m, ["--radix-like-max-tokens", "128", "--radix-like-eviction", "lfu"])
    assert collect_plugin_options(args, m) == {"radix_like": {"max_tokens": 128, "eviction": "lfu"}}


def test_bool_fields_have_a_negative_form():
    m = manager_with(Radixish)
    assert collect_plugin_options(parse(m, ["--radix-like-warm"]), m) == {
        "radix_like": {"warm": True}
    }
    assert collect_plugin_options(parse(m, ["--no-radix-like-warm"]), m) == {
        "radix_like": {"warm": False}
    }


def test_containers_are_given_as_json_and_optional_scalars_as_their_type():
    m = manager_with(Radixish)
    args = parse(m, ["--radix-like-buckets", "[4, 8]", "--radix-like-ratio", "0.5"])
    assert collect_plugin_options(args, m) == {"radix_like": {"buckets": [4, 8], "ratio": 0.5}}


def test_literal_fields_offer_their_choices():
    m = manager_with(Radixish)
    with pytest.raises(SystemExit):
        parse(m, ["--radix-like-eviction", "fifo"])


def test_selection_flags_per_slot_and_metrics_takes_several():
    m = manager_with(Radixish, Chatty)
    args = parse(m, ["--scheduler", "radix_like", "--metrics", "chatty", "prometheus"])
    assert args.scheduler == "radix_like"
    assert args.metrics == ["chatty", "prometheus"]
    assert parse(m, []).kv_cache is None


def test_help_shows_description_and_default():
    m = manager_with(Radixish)
    parser = argparse.ArgumentParser()
    add_plugin_arguments(parser, m)
    text = parser.format_help()
    assert "--radix-like-max-tokens" in text
    assert "[radix_like] Tokens kept for reuse. (default: 4096)" in " ".join(text.split())


def test_a_colliding_flag_is_skipped_with_a_warning_instead_of_crashing():
    parser = argparse.ArgumentParser()
    parser.add_argument("--radix-like-warm", action="store_true")
    parser.add_argument("--scheduler")
    m = manager_with(Radixish)
    args = parse(m, ["--radix-like-max-tokens", "3"], parser)
    assert collect_plugin_options(args, m) == {"radix_like": {"max_tokens": 3}}
    assert any("'warm' not exposed" in w for w in options.warnings)
    assert any("--scheduler is taken" in w for w in options.warnings)


def test_collected_options_validate_with_the_plugins_model():
    m = manager_with(Radixish)
    given = collect_plugin_options(parse(m, ["--radix-like-max-tokens", "7"]), m)
    plugin = m.create("scheduler", "radix_like", given["radix_like"])
    assert plugin.options.max_tokens == 7 and plugin.options.eviction == "lru"


def test_builtin_plugins_get_flags_through_entry_points():
    args = parse(PluginManager(), ["--sjf-max-wait-steps", "5"])
    assert collect_plugin_options(args, PluginManager()) == {"sjf": {"max_wait_steps": 5}}
