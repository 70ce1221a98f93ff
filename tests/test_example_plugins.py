"""The example packages, installed for real: `pegboard-hello-scheduler` is discovered through
its entry point, listed and selectable; `pegboard-broken-plugin` is listed as failed and breaks
nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import pytest
from pegboard.core.options import add_plugin_arguments, collect_plugin_options
from pegboard.core.plugin_manager import PluginLoadFailed, PluginManager

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def pegboard_plugins_json(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pegboard.core.cli.main", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def pip_install_target(package: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
        timeout=300,
    )


# ---------------------------------------------------------------- hello (installed for real)


def _hello_installed() -> bool:
    try:
        importlib_metadata.distribution("pegboard-hello-scheduler")
    except importlib_metadata.PackageNotFoundError:
        return False
    return True


needs_hello = pytest.mark.skipif(
    not _hello_installed(),
    reason="pegboard-hello-scheduler is not installed: "
    "pip install --no-deps ./examples/pegboard-hello-scheduler",
)


@needs_hello
def test_hello_is_discovered_through_its_entry_point():
    info = PluginManager().find("scheduler", "hello")
    assert (info.distribution, info.version) == ("pegboard-hello-scheduler", "0.1.0")
    assert info.entry_point == "pegboard_hello_scheduler:HelloScheduler"
    assert info.state == "available"


@needs_hello
def test_hello_is_selectable_by_name_with_its_options():
    plugin = PluginManager().create("scheduler", "hello", {"prompt_weight": 0.5})
    assert type(plugin).__module__ == "pegboard_hello_scheduler"
    assert plugin.options.prompt_weight == 0.5


@needs_hello
def test_hello_options_are_command_line_flags():
    import argparse

    manager = PluginManager()
    parser = argparse.ArgumentParser()
    add_plugin_arguments(parser, manager)
    args = parser.parse_args(["--scheduler", "hello", "--hello-prompt-weight", "2"])
    assert args.scheduler == "hello"
    assert collect_plugin_options(args, manager) == {"hello": {"prompt_weight": 2.0}}


@needs_hello
def test_hello_is_listed_by_pegboard_plugins():
    result = pegboard_plugins_json()
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["hello"]["distribution"] == "pegboard-hello-scheduler"
    assert [o["name"] for o in plugins["hello"]["options"]] == ["conservativeness", "prompt_weight"]


# ---------------------------------------------------------------- broken (pip --target)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken-site")
    pip_install_target(EXAMPLES / "pegboard-broken-plugin", site)
    return site


def test_broken_plugin_is_listed_as_failed_and_everything_else_is_available(broken_site):
    result = pegboard_plugins_json(broken_site)
    assert result.returncode == 0, result.stderr
    plugins = json.loads(result.stdout)["plugins"]
    broken = [p for p in plugins if p["name"] == "broken"]
    assert [p["state"] for p in broken] == [
        "failed: ImportError: pegboard-broken-plugin needs libfancy.so.3, which is not installed"
    ]
    assert broken[0]["distribution"] == "pegboard-broken-plugin"
    others = [p for p in plugins if p["name"] != "broken"]
    assert {p["name"] for p in others} >= {"fcfs", "sjf", "paged", "torch", "standard"}
    # Loaded fine; a GPU-only backend on a machine without CUDA says why it cannot run here.
    assert all(
        p["state"] == "available" or p["state"] == f"unavailable: {p['unavailable']}"
        for p in others
    ), [p["state"] for p in others]


def test_selecting_the_broken_plugin_names_its_package(broken_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    manager = PluginManager()
    with pytest.raises(PluginLoadFailed, match="pegboard-broken-plugin 0.1.0.*libfancy"):
        manager.create("scheduler", "broken")
    assert manager.create("scheduler", "fcfs").name == "fcfs"
