"""Patches at start-up (issue 10, item 5, the patch part): `serve` and `generate` log a gated-out
patch; with `--strict-patches` it is one clear line and exit status 2, before the port is bound
or the model loads. The patch is a real installed distribution (an entry point)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from fixtures.distributions import forget_modules, write_distribution
from pegboard.core.patches import check_patches
from pegboard.sdk import PatchError

GATED = "patch future is gated out"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A distribution publishing a patch whose gate (pegboard >= 9) fails and one that loads."""
    root = write_distribution(
        tmp_path_factory.mktemp("site"),
        "pegboard-future-patches",
        "0.3.0",
        {"pegboard.patches": {"future": "future_patches:Future", "ok": "future_patches:Fine"}},
        {
            "future_patches": """
                from pegboard.sdk import Patch, requires
                from pegboard.core.engine import Engine

                class Future(Patch, target=Engine, requires={"pegboard": ">=9"}):
                    def close(self):
                        raise AssertionError("never applied")

                class Fine(Patch, target=Engine):
                    @requires(torch=">=999")
                    def close(self):
                        raise AssertionError("never applied")
            """
        },
    )
    yield root
    forget_modules("future_patches")


def pegboard(site, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run([sys.executable, "-m", "pegboard.core.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)  # fmt: skip


def test_check_patches_reports_gates_without_applying_and_raises_when_strict(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    gated = check_patches(["future", "ok"])
    assert gated == {
        "future": "pegboard 0.1.0 does not satisfy >=9",
        "ok.close": gated["ok.close"],
    } and gated["ok.close"].startswith("torch ")
    with pytest.raises(PatchError, match=f"^{GATED} \\(--strict-patches\\): pegboard 0.1.0"):
        check_patches(["future"], strict=True)
    with pytest.raises(PatchError, match="unknown patch 'futur'"):
        check_patches(["futur"])


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_strict_patches_is_one_line_and_exit_2_before_the_model_or_the_port(site, command):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A model directory that does not exist would be reported too: the patch check comes
    # first, and nothing is loaded either way.
    args = ["--patch", "future", "--strict-patches", "--device", "cpu"]
    if command == "serve":
        args += ["--port", str(port)]
    else:
        args = ["hello", *args]
    proc = pegboard(site, command, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and GATED in lines[0] and "pegboard 0.1.0" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn" not in proc.stderr


def test_generate_logs_a_gated_out_patch_and_runs(site, tiny_llama_dir):
    proc = pegboard(site, "generate", "hello", "--model", str(tiny_llama_dir), "--device", "cpu",
                    "--dtype", "float32", "--max-tokens", "2", "--patch", "future")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{GATED}, not applied: pegboard 0.1.0 does not satisfy >=9" in proc.stderr


def test_serve_logs_a_gated_out_patch_at_start_and_serves(site, tiny_llama_dir, tmp_path):
    from test_server_process import ServerProcess

    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    server = ServerProcess(tiny_llama_dir, tmp_path, "--patch", "future",
                           env={"PYTHONPATH": pythonpath})  # fmt: skip
    try:
        server.wait_ready()
        assert f"{GATED}, not applied: pegboard 0.1.0 does not satisfy >=9" in server.log()
        assert server.health() == 200
    finally:
        assert server.stop() == 0, server.log()
