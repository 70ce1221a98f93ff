"""SIGTERM under load: the server stops accepting work, lets requests finish within
`--drain-timeout`, aborts the rest (their clients still get a finish reason) and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
from test_server_process import ServerProcess, stream_completion


def test_sigterm_under_load_drains_and_exits_zero(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--served-model-name", "tiny", "--drain-timeout", "0.5"
    ).wait_ready()
    seen_during_drain = {}

    async def main():
        client = server.async_client(timeout=60)

        def launch(prompt: str, max_tokens: int) -> tuple[asyncio.Task, asyncio.Event]:
            started = asyncio.Event()
            task = asyncio.create_task(
                stream_completion(client, prompt, started, max_tokens=max_tokens,
                                  temperature=0, extra_body={"ignore_eos": True})
            )  # fmt: skip
            return task, started

        long = [launch(f"Once upon a time {i}", 480) for i in range(24)]
        await asyncio.gather(*(started.wait() for _, started in long))
        short = [launch("Hello", 16) for _ in range(4)]
        await asyncio.gather(*(started.wait() for _, started in short))
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            seen_during_drain["health"] = (await http.get("/health")).status_code
            r = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            seen_during_drain["new request"] = r.status_code
        started = time.monotonic()
        tasks = [task for task, _ in long + short]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        await client.close()
        return results, time.monotonic() - started

    try:
        results, waited = asyncio.run(main())
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()
    assert seen_during_drain == {"health": 503, "new request": 503}
    reasons = [reason for _, reason in results]
    assert reasons[24:] == ["length"] * 4  # in flight at SIGTERM, done within the timeout
    assert "abort" in reasons[:24]  # long ones outlived the drain timeout and were aborted
    assert set(reasons) <= {"length", "abort"}
    assert waited < 10


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
