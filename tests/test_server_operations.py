"""Production operations of `pegboard serve`: the warm-up request before /health turns 200, the
torch profiler endpoints, the per-request time breakdown, and the watchdog that exits a server
whose step is stuck (a plugin that hangs, installed through a real entry point)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from test_server_process import ADMIN_TOKEN, ServerProcess

HANG_MAX_TOKENS = 13  # the hanging scheduler blocks once a request asks for this many tokens

HANG_PLUGIN = f'''
import threading

from pegboard.plugins.scheduling.fcfs import FCFSScheduler


class HangScheduler(FCFSScheduler):
    """FCFS, except that a request for {HANG_MAX_TOKENS} tokens hangs the step forever."""

    name = "hang"

    def schedule(self, waiting, running, budget, kv):
        if any(r.params.max_tokens == {HANG_MAX_TOKENS} for r in waiting):
            threading.Event().wait()
        return super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)
'''


def jsonl_requests(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["request"] for r in records if r.get("request")]


@pytest.fixture(scope="module")
def metrics_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metrics") / "metrics.jsonl"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, metrics_log):
    proc = ServerProcess(
        tiny_llama_dir,
        tmp_path_factory.mktemp("serve"),
        "--served-model-name", "tiny",
        "--admin-token", ADMIN_TOKEN,
        "--metrics", "jsonl",
        "--jsonl-path", str(metrics_log),
        "--jsonl-flush-interval-s", "0",
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


def test_a_warmup_request_ran_before_health_turned_200(server, metrics_log):
    warmups = [r for r in jsonl_requests(metrics_log) if r["request_id"].startswith("warmup-")]
    assert len(warmups) == 1
    assert warmups[0]["finish_reason"] == "length" and warmups[0]["num_output_tokens"] == 4
    assert "warm-up request done" in server.log()


def test_profile_endpoints_write_a_trace_of_the_steps(server, tmp_path):
    out = tmp_path / "traces"
    assert server.admin("POST", "/start_profile", token=None, json={"output_dir": str(out)}).status_code == 401  # fmt: skip
    assert server.admin("POST", "/stop_profile").status_code == 409  # nothing running
    r = server.admin("POST", "/start_profile", json={"output_dir": "relative/dir"})
    assert r.status_code == 400
    r = server.admin("POST", "/start_profile", json={"output_dir": str(out)})
    assert r.status_code == 200, r.text
    assert server.admin("POST", "/start_profile", json={"output_dir": str(out)}).status_code == 409
    server.client().completions.create(model="tiny", prompt="hello", max_tokens=4)
    r = server.admin("POST", "/stop_profile")
    assert r.status_code == 200, r.text
    trace = Path(r.json()["trace"])
    assert trace.parent == out and trace.is_file()
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "pegboard.step" in names


def test_each_choice_reports_its_time_breakdown(server):
    out = server.client().completions.create(model="tiny", prompt="hello", max_tokens=6, n=2)
    for choice in out.choices:
        timing = choice.model_extra["timing"]
        assert set(timing) == {"queue_s", "prefill_s", "decode_s", "detokenize_s"}
        assert all(v >= 0 for v in timing.values())
        assert timing["decode_s"] > 0  # five tokens after the first
    chunks = list(
        server.client().completions.create(model="tiny", prompt="hello", max_tokens=3, stream=True)
    )
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].model_extra["timing"]["prefill_s"] >= 0


@pytest.fixture
def hang_plugin(tmp_path) -> str:
    """A directory holding a scheduler plugin that hangs and its distribution metadata, so that
    entry-point discovery finds it when the directory is on the path (as a pip install would)."""
    site = tmp_path / "site"
    dist = site / "pegboard_hang-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "hang_plugin.py").write_text(HANG_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pegboard-hang\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pegboard.plugins]\nhang = hang_plugin:HangScheduler\n")
    return str(site)


@pytest.mark.slow
def test_watchdog_exits_a_server_whose_step_is_stuck(tiny_llama_dir, tmp_path, hang_plugin):
    log = tmp_path / "metrics.jsonl"
    pythonpath = os.pathsep.join(filter(None, [hang_plugin, os.environ.get("PYTHONPATH")]))
    # 10 s: the tiny model's steps take milliseconds even on a busy machine (the test waits
    # this long for the watchdog).
    server = ServerProcess(
        tiny_llama_dir, tmp_path,
        "--served-model-name", "tiny", "--scheduler", "hang", "--watchdog-timeout", "10",
        "--skip-warmup", "--metrics", "jsonl", "--jsonl-path", str(log),
        "--jsonl-flush-interval-s", "0",
        env={"PYTHONPATH": pythonpath},
    ).wait_ready()  # fmt: skip
    try:
        assert jsonl_requests(log) == []  # --skip-warmup: no warm-up request
        ok = server.client().completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert ok.usage.completion_tokens == 2  # steps that finish do not trip it

        def stuck_request() -> None:
            try:
                httpx.post(server.url + "/v1/completions", timeout=300,
                           json={"prompt": "hello", "max_tokens": HANG_MAX_TOKENS})  # fmt: skip
            except httpx.TransportError:
                pass  # the server exits under it

        threading.Thread(target=stuck_request, daemon=True).start()
        status = server.proc.wait(900)  # bounds a hang only
    finally:
        server.stop()
    log_text = server.log()
    assert status == 3, log_text
    assert "has not finished after" in log_text and "--watchdog-timeout 10" in log_text
    assert "hang_plugin.py" in log_text and "in schedule" in log_text  # the stuck stack
    assert "active plugins: {'scheduler': ['hang']" in log_text


def test_a_swap_over_http_cannot_name_files_for_the_engine_to_load(server):
    r = server.admin(
        "POST", "/admin/plugins/attention",
        json={"name": "flashinfer", "options": {"kernel_dir": "/tmp/attacker-kernels"}},
    )  # fmt: skip
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert "--flashinfer-kernel-dir" in error["message"] and error["param"] == "options.kernel_dir"
    assert server.admin("GET", "/admin/plugins").json()["active"]["attention"] == "torch"


def test_memory_sizing_options_of_a_swap_are_bounded(server):
    r = server.admin(
        "POST", "/admin/plugins/kv_cache", json={"name": "hicache", "options": {"host_ratio": 1e6}}
    )
    assert r.status_code == 422, r.text
    assert "host_ratio" in r.json()["error"]["message"]


def test_options_naming_paths_are_start_time_only_by_their_name():
    import pydantic
    from pegboard.core.server.swap_options import start_time_only

    class Options(pydantic.BaseModel):
        cache_path: str = ""
        library_file: str = ""
        ratio: float = 1.0

    fields = Options.model_fields
    assert start_time_only("cache_path", fields["cache_path"])
    assert start_time_only("library_file", fields["library_file"])
    assert not start_time_only("ratio", fields["ratio"])
