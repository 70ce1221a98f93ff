"""SIGTERM under load: the server stops accepting work, lets requests finish within
`--drain-timeout`, aborts the rest (their clients still get a finish reason) and exits 0."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from test_server_process import ServerProcess, stream_completion


def sigterm_under_load(
    server: ServerProcess, num: int, max_tokens: int, probe: bool = True
) -> tuple[list, dict]:
    """Stream `num` requests, SIGTERM once each has its first token, then (with `probe`) probe
    the draining server; the requests' finish reasons and what the probes saw."""
    seen_during_drain = {}

    async def main():
        client = server.async_client(timeout=600)
        started = [asyncio.Event() for _ in range(num)]
        tasks = [
            asyncio.create_task(
                stream_completion(client, f"Once upon a time {i}", started[i],
                                  max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
            )
            for i in range(num)
        ]  # fmt: skip
        await asyncio.gather(*(s.wait() for s in started))
        server.proc.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            if not probe:  # a zero drain timeout: the server may be gone at once
                return await asyncio.gather(*tasks)
            # Wait for the drain to begin (the signal is handled on the server's event loop).
            while (health := (await http.get("/health")).status_code) == 200:
                await asyncio.sleep(0.01)
            seen_during_drain["health"] = health
            r = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            seen_during_drain["new request"] = r.status_code
        results = await asyncio.gather(*tasks)
        await client.close()
        return results

    try:
        results = asyncio.run(main())
        assert server.proc.wait(600) == 0, server.log()
    finally:
        server.stop()
    return [reason for _, reason in results], seen_during_drain


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish_within_the_drain_timeout(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--served-model-name", "tiny", "--drain-timeout", "300",
        "--skip-warmup",
    ).wait_ready()  # fmt: skip
    reasons, seen = sigterm_under_load(server, num=6, max_tokens=200)
    assert seen == {"health": 503, "new request": 503}
    assert reasons == ["length"] * 6  # every request in flight at SIGTERM ran to its end


@pytest.mark.slow
def test_requests_outliving_the_drain_timeout_are_aborted(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--served-model-name", "tiny", "--drain-timeout", "0",
        "--skip-warmup",
    ).wait_ready()  # fmt: skip
    reasons, _ = sigterm_under_load(server, num=6, max_tokens=480, probe=False)
    assert "abort" in reasons  # still running when the (zero) drain timeout passed
    assert set(reasons) <= {"length", "abort"}  # and every client got a finish reason


def test_shutdown_during_loading_waits_for_the_load_then_stops_the_engine():
    """SIGTERM while the model loads: exiting with the loading thread inside torch code aborts
    the process (exit 134), so shutdown lets the load finish and stops the new engine."""
    import threading
    import time as _time

    from pegboard.core.server.lifecycle import ServerSettings, ServerState

    stopped = threading.Event()

    class SlowEngine:
        error = None

        def shutdown(self):
            stopped.set()

    def factory():
        _time.sleep(0.5)
        return SlowEngine()

    state = ServerState(ServerSettings(["tiny"]), engine_factory=factory)
    state.start_loading()
    assert not state.loaded.is_set()
    state.shutdown()
    assert state.loaded.is_set() and stopped.is_set()
