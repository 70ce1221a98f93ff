"""`pegboard bench serve` against a real server, `bench offline --peer transformers`, and
`--chart`: at tiny scale on the CPU with the tiny Llama fixture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pegboard.core.bench.offline import OfflineWorkload
from pegboard.core.bench.peer import run_peer
from pegboard.core.bench.serve import (
    ServeWorkload,
    arrival_offsets,
    check_loopback,
    latency_summary,
    percentile,
)
from pegboard.core.cli.main import main
from test_server_process import ServerProcess

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Token ids inside the tiny fixture's 512-token vocabulary.
SMALL = ["--min-input", "8", "--max-input", "32", "--max-token-id", "500"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("bench-serve"))
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


def bench_serve(server, tmp_path, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--url", server.url, "--no-progress", "--json", str(out), *flags])
    return rc, json.loads(out.read_text())


def test_bench_serve_every_request_succeeds_with_consistent_latencies(server, tmp_path):
    chart = tmp_path / "serve.png"
    rc, result = bench_serve(
        server,
        tmp_path,
        "--num-prompts", "8", "--concurrency", "4", *SMALL,
        "--min-output", "4", "--max-output", "16", "--chart", str(chart),
    )  # fmt: skip
    assert rc == 0
    assert (result["requests"], result["completed"], result["failed"]) == (8, 8, 0)
    per_request = result["per_request"]
    for r in per_request:
        assert r["error"] is None
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos: exactly what was asked
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert r["tpot_s"] == pytest.approx(
            (r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1), rel=1e-3, abs=1e-6
        )
    assert result["output_tokens"] == sum(r["max_tokens"] for r in per_request)
    assert result["input_tokens"] == sum(r["prompt_tokens"] for r in per_request) > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = result[metric]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], metric
    assert result["ttft_ms"]["p99"] <= result["e2e_ms"]["p99"]
    elapsed = result["elapsed_s"]
    assert result["requests_per_s"] == pytest.approx(8 / elapsed, rel=0.01)
    assert result["output_tok_s"] == pytest.approx(result["output_tokens"] / elapsed, rel=0.01)
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_bench_serve_concurrency_one_runs_requests_one_after_another(server, tmp_path):
    rc, result = bench_serve(
        server, tmp_path, "--num-prompts", "3", "--concurrency", "1", *SMALL,
        "--min-output", "3", "--max-output", "6",
    )  # fmt: skip
    assert rc == 0 and result["completed"] == 3
    # Never two in flight: their e2e times add up to at most the run's (rounded to 1 ms).
    assert sum(r["e2e_s"] for r in result["per_request"]) <= result["elapsed_s"] + 0.001


def test_bench_serve_poisson_arrivals_and_a_prompts_file(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('hello there\n{"prompt": [5, 6, 7], "max_tokens": 3}\n')
    rc, result = bench_serve(
        server, tmp_path, "--num-prompts", "4", "--request-rate", "50", "--prompts", str(prompts),
        "--min-output", "4", "--max-output", "4",
    )  # fmt: skip
    assert rc == 0 and result["request_rate"] == 50
    assert [r["max_tokens"] for r in result["per_request"]] == [4, 3, 4, 3]
    assert [r["output_tokens"] for r in result["per_request"]] == [4, 3, 4, 3]


def test_bench_serve_cancels_what_runs_past_the_time_limit(server, tmp_path):
    rc, result = bench_serve(
        server, tmp_path, "--num-prompts", "2", *SMALL, "--min-output", "400",
        "--max-output", "400", "--time-limit", "0.05",
    )  # fmt: skip
    assert rc == 1
    assert result["failed"] == 2
    assert "time limit" in result["errors"][0]


@pytest.mark.slow
def test_bench_serve_waits_for_a_server_still_loading(tiny_llama_dir, tmp_path):
    proc = ServerProcess(tiny_llama_dir, tmp_path)  # not yet ready: /health answers 503
    try:
        rc, result = bench_serve(
            proc, tmp_path, "--wait", "120", "--num-prompts", "2", *SMALL,
            "--min-output", "2", "--max-output", "2",
        )  # fmt: skip
        assert rc == 0 and result["completed"] == 2
    finally:
        assert proc.stop() == 0, proc.log()


def test_bench_serve_refuses_a_server_off_this_machine(capsys):
    assert main(["bench", "serve", "--url", "http://10.1.2.3:8000"]) == 2
    assert "on this machine" in capsys.readouterr().err
    assert check_loopback("http://localhost:8000/") == "http://localhost:8000"


def test_poisson_arrivals_are_seeded_with_the_requested_mean_gap():
    offsets = arrival_offsets(2000, 10.0, seed=3)
    assert offsets == arrival_offsets(2000, 10.0, seed=3)
    assert offsets != arrival_offsets(2000, 10.0, seed=4)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.1, rel=0.1)
    assert arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_percentiles_interpolate_between_order_statistics():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert latency_summary([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98}


def test_random_serve_prompts_match_the_offline_workload():
    serve = ServeWorkload(num_prompts=5, min_input=3, max_input=9, min_output=2, max_output=7)
    offline = OfflineWorkload(num_seqs=5, min_input=3, max_input=9, min_output=2, max_output=7)
    prompts, params = offline.build()
    assert serve.build() == [(p, sp.max_tokens) for p, sp in zip(prompts, params)]


@pytest.mark.slow
def test_offline_peer_transformers_runs_the_same_workload(tiny_llama_dir, tmp_path):
    out, chart = tmp_path / "offline.json", tmp_path / "offline.png"
    rc = main(
        ["bench", "offline", "--model", str(tiny_llama_dir), "--dtype", "float32",
         "--device", "cpu", "--num-seqs", "2", *SMALL, "--min-output", "4", "--max-output", "8",
         "--peer", "transformers", "--peer-timeout", "120", "--json", str(out),
         "--chart", str(chart)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    peer = result["peer"]
    assert result["engine"] == "pegboard" and peer["engine"] == "transformers"
    assert peer["mode"] == "continuous_batching" and peer["dtype"] == "float32"
    assert (peer["requests"], peer["finished"], peer["timed_out"]) == (2, 2, False)
    assert peer["lengths_as_requested"]
    assert peer["output_tokens"] == result["output_tokens"]
    assert result["output_tok_s"] > 0 and peer["output_tok_s"] > 0
    assert result["pegboard_vs_peer"] == pytest.approx(
        result["output_tok_s"] / peer["output_tok_s"], rel=0.01
    )
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    layer = result["plugin_layer"]
    assert set(layer["hook_dispatch_us"]) == {"schedule", "allocate_kv", "sample"}
    assert all(0 < us < 1000 for us in layer["hook_dispatch_us"].values())
    assert result["steps"] > 0 and layer["mean_step_ms"] == pytest.approx(
        1e3 * result["elapsed_s"] / result["steps"], rel=0.05, abs=0.01
    )
    assert layer["plugin_layer_share_pct"] == pytest.approx(
        100 * layer["hook_dispatch_per_step_us"] / 1e3 / layer["mean_step_ms"], rel=0.05
    )


def test_peer_runs_one_sequence_through_generate(tiny_llama_dir):
    workload = OfflineWorkload(
        num_seqs=1, min_input=8, max_input=8, min_output=6, max_output=6, max_token_id=500
    )
    result = run_peer(
        "transformers", tiny_llama_dir, workload, dtype=torch.float32, device=torch.device("cpu")
    )
    assert (result["mode"], result["finished"], result["output_tokens"]) == ("generate", 1, 6)
    assert result["output_tok_s"] > 0 and not result["timed_out"]


@pytest.mark.slow
def test_peer_stops_at_its_timeout(tiny_llama_dir):
    workload = OfflineWorkload(
        num_seqs=1, min_input=8, max_input=8, min_output=400, max_output=400, max_token_id=500
    )
    result = run_peer(
        "transformers",
        tiny_llama_dir,
        workload,
        dtype=torch.float32,
        device=torch.device("cpu"),
        timeout=0.02,
    )
    assert result["timed_out"] and result["finished"] == 0
    assert 0 < result["output_tokens"] < 400


@pytest.mark.slow
def test_bench_serve_starts_and_stops_a_random_weight_server(tiny_llama_dir, tmp_path):
    """`--random-weights --config PATH`: a `pegboard serve` of its own with dummy weights of
    that config on --url's port; benchmarked, then stopped (the port is free again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "serve.json"
    rc = main(
        ["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--random-weights",
         "--config", str(tiny_llama_dir / "config.json"), "--server-args",
         "--dtype float32 --device cpu --kv-cache-tokens 4096", "--num-prompts", "3", *SMALL,
         "--min-output", "3", "--max-output", "3", "--no-progress", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["output_tokens"] == 9
    assert result["server"]["load_format"] == "dummy"
    assert "--load-format" in result["server"]["args"] and "dummy" in result["server"]["args"]
    with socket.socket() as s:  # the server is gone: nothing listens on its port
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bench_serve_random_weights_needs_a_config(capsys):
    assert main(["bench", "serve", "--random-weights"]) == 2
    assert "--config" in capsys.readouterr().err


def test_bench_serve_reports_a_server_that_exits_before_it_is_ready(tiny_llama_dir, capsys):
    """Bad `--server-args`: the started server exits with a usage error; bench serve says so
    at once instead of waiting for /health."""
    import time

    start = time.monotonic()
    rc = main(
        ["bench", "serve", "--url", "http://127.0.0.1:8767", "--random-weights",
         "--config", str(tiny_llama_dir / "config.json"), "--server-args=--no-such-flag",
         "--num-prompts", "1", "--no-progress"]
    )  # fmt: skip
    assert rc == 2
    assert "the server exited with code 2 before it was ready" in capsys.readouterr().err
    assert time.monotonic() - start < 120  # not the 900 s readiness wait
