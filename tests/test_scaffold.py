"""`pegboard plugin new`: the generated package installs with pip, passes its own conformance
tests as generated, and is then discovered by `pegboard plugins`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from pegboard.core.cli.main import main
from pegboard.sdk.scaffold import TEMPLATED_SLOTS, ScaffoldError, create_plugin_package


def run(
    args: list[str], pythonpath: Path | str, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.mark.slow
def test_generated_package_installs_passes_its_tests_and_is_listed(tmp_path):
    assert main(["plugin", "new", "fair-share", "--slot", "scheduler", "--dir", str(tmp_path)]) == 0
    package = tmp_path / "pegboard-fair-share"
    site = tmp_path / "site"
    pip = [
        "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
        "--target", str(site), str(package),
    ]  # fmt: skip
    result = run(pip, site)
    assert result.returncode == 0, result.stderr

    tests = run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")], site, cwd=tmp_path
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout

    listing = run(["-m", "pegboard.core.cli.main", "plugins", "--json"], site)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["fair-share"]["slot"] == "scheduler"
    assert plugins["fair-share"]["distribution"] == "pegboard-fair-share"
    assert plugins["fair-share"]["entry_point"] == "pegboard_fair_share:FairShareScheduler"
    assert plugins["fair-share"]["state"] == "available"


OTHER_SLOTS = [s for s in TEMPLATED_SLOTS if s != "scheduler"]


@pytest.fixture(scope="module")
def template_results(tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """Every other slot's package as generated, its tests run by one pytest process (one
    interpreter start instead of one per slot); slot -> [(test, outcome)] from its report."""
    root = tmp_path_factory.mktemp("templates")
    packages = {slot: create_plugin_package(f"my-{slot.replace('_', '-')}", slot, root)
                for slot in OTHER_SLOTS}  # fmt: skip
    report = root / "report.xml"
    sources = os.pathsep.join(str(p / "src") for p in packages.values())
    tests = [str(p / "tests") for p in packages.values()]
    done = run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests],
        sources,
        cwd=root,
    )
    assert report.exists(), done.stdout + done.stderr
    results: dict[str, list[tuple[str, str]]] = {slot: [] for slot in packages}
    for case in ElementTree.parse(report).iter("testcase"):
        verdicts = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome = " ".join(f"{c.tag}: {c.get('message')}" for c in verdicts) or "passed"
        for slot, package in packages.items():
            if case.get("classname", "").endswith("test_" + package.name.replace("-", "_")):
                results[slot].append((case.get("name"), outcome))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("slot", OTHER_SLOTS)
def test_every_slot_template_passes_its_own_tests(template_results, slot):
    results = template_results[slot]
    assert results, f"no test of the {slot} template ran"
    assert all(outcome == "passed" for _, outcome in results), results


def test_generated_pyproject_declares_the_entry_point(tmp_path):
    package = create_plugin_package("hot-cache", "kv_cache", tmp_path)
    pyproject = (package / "pyproject.toml").read_text()
    assert '[project.entry-points."pegboard.plugins"]' in pyproject
    assert 'hot-cache = "pegboard_hot_cache:HotCache"' in pyproject
    assert (package / "src" / "pegboard_hot_cache" / "__init__.py").exists()
    assert (package / "tests" / "test_pegboard_hot_cache.py").exists()


@pytest.mark.parametrize(
    "name, slot, message",
    [
        ("Fair_Share", "scheduler", "invalid plugin name 'Fair_Share'"),
        ("fair", "schedular", "unknown slot 'schedular'"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(tmp_path, name, slot, message):
    with pytest.raises(ScaffoldError, match=message):
        create_plugin_package(name, slot, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_slot_without_a_template_is_refused_naming_those_with_one(tmp_path, monkeypatch):
    from pegboard.sdk import scaffold

    monkeypatch.setattr(scaffold, "TEMPLATED_SLOTS", ("scheduler",))
    with pytest.raises(
        ScaffoldError, match="no template for slot 'linear'; templates exist for: scheduler"
    ):
        create_plugin_package("fair", "linear", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_package_is_never_overwritten(tmp_path, capsys):
    create_plugin_package("fair", "scheduler", tmp_path)
    module = tmp_path / "pegboard-fair" / "src" / "pegboard_fair" / "__init__.py"
    module.write_text("# my work\n")
    assert main(["plugin", "new", "fair", "--slot", "scheduler", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert module.read_text() == "# my work\n"
