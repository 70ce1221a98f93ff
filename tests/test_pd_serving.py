"""PD disaggregation as real processes on loopback: a prefill server, a decode server and
`pegboard router --pd` in front, driven by the official `openai` client, with `--transfer
mooncake` and with `--transfer nixl`. The decode server also serves requests without a
bootstrap as a colocated engine: that is the reference the PD outputs must equal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fixtures.transfer import TRANSFER_BACKENDS
from pegboard.core.disaggregation.fault import HOLD_ENV
from prometheus_client.parser import text_string_to_metric_families
from test_server_process import ServerProcess, free_port

pytestmark = pytest.mark.slow


BACKENDS = TRANSFER_BACKENDS
ENGINE = (
    "--served-model-name", "m", "--page-size", "4", "--kv-cache-tokens", "2048",
    "--disaggregation-heartbeat-interval", "0.5",
)  # fmt: skip
UCX = {"UCX_TLS": "tcp", "UCX_MODULES": "^ib"}
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a king who had three daughters and "
    "a very old dog that slept all day long by the fire",  # longer than one chunk
    "Once upon a time, in a land far away, there lived a queen",  # shares a prefix
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


class RouterProcess:
    def __init__(self, log_dir, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"router-{self.port}.log"
        cmd = [sys.executable, "-m", "pegboard.core.cli.main", "router", "--pd"]
        cmd += ["--port", str(self.port), "--health-interval", "0.2", *flags]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> RouterProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log_path.read_text())

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's series on `server`'s /metrics, those with `labels` only."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"pegboard:{name}" and labels.items() <= s.labels.items():
                total += s.value
    return total


def start_pair(model_dir, tmp_path, backend: str, *prefill_flags: str, prefill_env=None):
    bport = free_port()
    prefill = ServerProcess(
        model_dir, tmp_path, *ENGINE, "--kv-cache", "radix", "--max-num-batched-tokens", "16",
        "--disaggregation-mode", "prefill", "--transfer", backend,
        "--disaggregation-bootstrap-port", str(bport), *prefill_flags,
        env={**UCX, **(prefill_env or {})},
    )  # fmt: skip
    decode = ServerProcess(
        model_dir, tmp_path, *ENGINE, "--disaggregation-mode", "decode", "--transfer", backend,
        env=UCX,
    )  # fmt: skip
    prefill.wait_ready(timeout=600)  # two servers start at once on 2 busy cores
    decode.wait_ready(timeout=600)
    router = RouterProcess(
        tmp_path, "--prefill", prefill.url, str(bport), "--decode", decode.url
    ).wait_ready()
    return prefill, decode, router


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """Module-scoped, so that pytest runs both tests of one backend before the next backend."""
    return request.param


@pytest.fixture(scope="module")
def pairs(tiny_llama_dir, tmp_path_factory):
    """`get(backend)`: the backend's (prefill, decode, router, hold) as started once for both
    tests, or started again if its prefill server is gone (the kill test ends it). The prefill
    server runs with the test-only transfer hold, released (`hold/release` exists) until the
    kill test removes that file. A pair of another backend is stopped first."""
    started: dict[str, tuple] = {}

    def stop(backend: str) -> None:
        prefill, decode, router, _ = started.pop(backend)
        router.stop()
        prefill.stop()
        decode.stop()

    def get(backend: str):
        for other in [b for b in started if b != backend]:
            stop(other)
        if backend in started and started[backend][0].proc.poll() is not None:
            stop(backend)
        if backend not in started:
            tmp_path = tmp_path_factory.mktemp(f"pd-{backend}")
            hold = tmp_path / "hold"
            hold.mkdir()
            (hold / "release").touch()
            pair = start_pair(tiny_llama_dir, tmp_path, backend, prefill_env={HOLD_ENV: str(hold)})
            started[backend] = (*pair, hold)
        (started[backend][3] / "release").touch()
        return started[backend]

    yield get
    for backend in list(started):
        stop(backend)


def complete(client: openai.OpenAI, prompt: str, **kw):
    return client.completions.create(
        model="m", prompt=prompt, **{"max_tokens": 8, "temperature": 0, **kw}
    )


def test_pd_through_the_router_equals_colocated_and_streams(pairs, backend):
    prefill, decode, router, _ = pairs(backend)
    direct = decode.client(timeout=120)  # no bootstrap: the decode server runs it alone
    expected = [complete(direct, p).choices[0].text for p in PROMPTS]
    client = router.client()
    for _ in range(2):  # the second round hits the prefill server's radix cache
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: complete(client, p).choices[0].text, PROMPTS))
        assert got == expected
    assert metric(prefill, "prefix_cache_hits_total") > 0
    stream = complete(client, PROMPTS[1], stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected[1]
    assert metric(decode, "kv_cache_usage_perc") == 0.0
    assert "GB/s" in prefill.log()  # the KV went through the transfer plugin
    n = 2 * len(PROMPTS) + 1  # every request's KV went across once, none failed
    for server, role in ((prefill, "prefill"), (decode, "decode")):
        ok = metric(server, "kv_transfers_total", backend=backend, role=role, result="ok")
        assert ok == n
        assert metric(server, "kv_transfers_total", result="failed") == 0
        assert metric(server, "kv_transfer_duration_seconds_count", role=role) == n
    sent = metric(prefill, "kv_transfer_bytes_total", backend=backend, role="prefill")
    assert sent > 0 and sent == metric(decode, "kv_transfer_bytes_total", role="decode")


def wait_for(condition, log, timeout: float = 120) -> None:
    """Wait for an event (the timeout only bounds a hang on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, log()
        time.sleep(0.02)


def test_killing_the_prefill_server_mid_transfer_fails_requests_and_frees_decode_pages(
    pairs, backend
):
    prefill, decode, router, hold = pairs(backend)
    # From now on the prefill server posts each transfer, then holds it unfinished (test-only
    # fault injection, core/disaggregation/fault.py): every request is provably mid-transfer.
    (hold / "release").unlink()
    direct = decode.client(timeout=120)  # a request of the decode server's own
    expected = complete(direct, PROMPTS[0], max_tokens=24).choices[0].text
    client = router.client()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, client, p) for p in PROMPTS[1:]]
        wait_for(lambda: len(list(hold.glob("held-*"))) == len(futures), prefill.log)
        # The decode server holds pages for all three and decodes none of them.
        wait_for(lambda: metric(decode, "kv_cache_usage_perc") > 0, decode.log)
        assert metric(decode, "num_requests_running") == 0
        bystander = complete(direct, PROMPTS[0], max_tokens=24, stream=True)
        first = next(bystander)  # running on the decode server as the prefill dies
        os.kill(prefill.proc.pid, signal.SIGKILL)
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, openai.APIError) for e in errors), errors
    # The decode server lost its control channel to the prefill server: the error says so.
    assert all("lost the prefill engine" in str(e) for e in errors), errors
    text = first.choices[0].text + "".join(c.choices[0].text for c in bystander)
    assert text == expected  # the decode server's other request is unaffected
    wait_for(lambda: metric(decode, "kv_cache_usage_perc") == 0.0, decode.log)
    failed = metric(decode, "kv_transfers_total", role="decode", result="failed")
    assert failed == len(futures)
    assert decode.health() == 200  # the decode server lives on
    assert complete(direct, PROMPTS[0], max_tokens=24).choices[0].text == expected


def test_unknown_transfer_backend_is_a_clear_error(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--disaggregation-mode", "decode", "--transfer", "carrier-pigeon"
    )
    assert server.proc.wait(120) == 2
    assert "carrier-pigeon" in server.log() and "mooncake" in server.log()
    server.stop()
