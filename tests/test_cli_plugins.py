"""`pegboard plugins [--json]`: every plugin and patch with its distribution, state and options;
exit 0 even when an installed plugin is broken."""

from __future__ import annotations

import json

import pytest
from fixtures.distributions import forget_modules, write_distribution
from pegboard.core.cli.main import main


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A plugin with options, a broken plugin, and two patches (usable and gated out)."""
    write_distribution(
        tmp_path,
        "acme-extras",
        "3.1.4",
        {
            "pegboard.plugins": {"fair": "acme_extras:Fair", "cuda-only": "acme_cuda:Thing"},
            "pegboard.patches": {"quiet": "acme_extras:Quiet", "future": "acme_extras:Future"},
        },
        {
            "acme_extras": """
                import pydantic
                from pegboard.sdk import Patch, SchedulePlan, Scheduler
                from pegboard.sdk.slots import Plugin

                class FairOptions(pydantic.BaseModel):
                    share: float = pydantic.Field(0.5, description="Fraction for the smallest.")
                    strict: bool = False

                class Fair(Scheduler):
                    name = "fair"
                    Options = FairOptions

                    def schedule(self, waiting, running, budget, kv):
                        return SchedulePlan()

                class Quiet(Patch, target=Plugin):
                    def close(self):
                        pass

                class Future(Patch, target=Plugin):
                    requires = {"pegboard": ">=7"}

                    def close(self):
                        pass
            """,
            "acme_cuda": "raise OSError('libcudart.so.12: cannot open shared object file')\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PEGBOARD_PLUGINS", raising=False)
    monkeypatch.delenv("PEGBOARD_DISABLE_PLUGINS", raising=False)
    yield
    forget_modules("acme_extras", "acme_cuda")


def run_json(capsys) -> dict:
    assert main(["plugins", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_lists_plugins_with_distribution_state_and_options(installed, capsys):
    plugins = {p["name"]: p for p in run_json(capsys)["plugins"]}
    fair = plugins["fair"]
    assert (fair["slot"], fair["distribution"], fair["version"], fair["state"]) == (
        "scheduler",
        "acme-extras",
        "3.1.4",
        "available",
    )
    assert fair["options"][0] == {
        "name": "share",
        "type": "float",
        "default": 0.5,
        "required": False,
        "description": "Fraction for the smallest.",
    }
    assert plugins["fcfs"]["distribution"] == "pegboard"


def test_a_broken_plugin_is_shown_failed_and_the_command_succeeds(installed, capsys):
    plugins = {p["name"]: p for p in run_json(capsys)["plugins"]}
    assert plugins["cuda-only"]["state"] == (
        "failed: OSError: libcudart.so.12: cannot open shared object file"
    )
    assert plugins["cuda-only"]["distribution"] == "acme-extras"
    assert plugins["fair"]["state"] == "available"


def test_json_lists_patches_with_their_gate_state(installed, capsys):
    patches = {p["name"]: p for p in run_json(capsys)["patches"]}
    assert patches["quiet"]["state"] == "available"
    assert patches["quiet"]["target"] == "pegboard.sdk.slots.Plugin"
    assert patches["quiet"]["methods"] == ["close"]
    assert patches["future"]["state"] == "gated out: pegboard 0.1.0 does not satisfy >=7"


def test_disabled_plugins_are_listed_as_disabled(installed, capsys, monkeypatch):
    monkeypatch.setenv("PEGBOARD_DISABLE_PLUGINS", "fair")
    plugins = {p["name"]: p for p in run_json(capsys)["plugins"]}
    assert plugins["fair"]["state"] == "disabled"


def test_table_shows_each_plugin_its_option_flags_and_the_patches(installed, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["SLOT", "NAME", "DISTRIBUTION", "CHOICE", "STATE"]
    fair = next(i for i, line in enumerate(lines) if line.split()[:2] == ["scheduler", "fair"])
    assert "acme-extras 3.1.4" in lines[fair] and lines[fair].endswith("available")
    assert lines[fair + 1].split()[:3] == ["--fair-share", "float", "(default"]
    assert "Fraction for the smallest." in lines[fair + 1]
    assert lines[fair + 2].split()[:2] == ["--fair-strict", "bool"]
    assert any("cuda-only" in line and "failed: OSError" in line for line in lines)
    assert any(line.split()[:1] == ["PATCH"] for line in lines)
    assert any("future" in line and "gated out" in line for line in lines)
