"""PD disaggregation as real processes on loopback: a prefill server, a decode server and
`pegboard router --pd` in front, driven by the official `openai` client, with `--transfer
mooncake` and with `--transfer nixl`. The decode server also serves requests without a
bootstrap as a colocated engine: that is the reference the PD outputs must equal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fixtures.transfer import TRANSFER_BACKENDS
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


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = re.findall(rf"^pegboard:{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in values)


def start_pair(model_dir, tmp_path, backend: str, *prefill_flags: str):
    bport = free_port()
    prefill = ServerProcess(
        model_dir, tmp_path, *ENGINE, "--kv-cache", "radix", "--max-num-batched-tokens", "16",
        "--disaggregation-mode", "prefill", "--transfer", backend,
        "--disaggregation-bootstrap-port", str(bport), *prefill_flags, env=UCX,
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


def complete(client: openai.OpenAI, prompt: str, **kw):
    return client.completions.create(
        model="m", prompt=prompt, **{"max_tokens": 8, "temperature": 0, **kw}
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_pd_through_the_router_equals_colocated_and_streams(tiny_llama_dir, tmp_path, backend):
    prefill, decode, router = start_pair(tiny_llama_dir, tmp_path, backend)
    try:
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
    finally:
        router.stop()
        prefill.stop()
        decode.stop()


@pytest.mark.skip(
    reason="races the transfer it kills (CI 2026-11-30: all requests done before the kill, or "
    "KV already there); the dead-prefill path is covered in-process by "
    "tests/test_disaggregation.py until a fault-injection point can hold the transfer"
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_killing_the_prefill_server_mid_transfer_fails_requests_and_frees_decode_pages(
    tiny_llama_dir, tmp_path, backend
):
    # A tiny chunk budget keeps the prefill busy for many steps while the decode side waits.
    prefill, decode, router = start_pair(
        tiny_llama_dir, tmp_path, backend, "--max-num-batched-tokens", "2"
    )
    try:
        client = router.client()
        long_prompt = " ".join(str(i) for i in range(40))  # ~110 tokens
        errors = None
        # A round whose transfers all finish before the decode server is seen holding pages
        # for requests still waiting for KV (a quiet, fast machine) is followed by another.
        for attempt in range(5):
            with ThreadPoolExecutor(3) as pool:
                futures = [
                    pool.submit(complete, client, f"{attempt} {k} {long_prompt}", max_tokens=64)
                    for k in range(3)
                ]
                deadline = time.monotonic() + 120
                # Wait until the decode server holds pages for requests whose KV has not arrived.
                while not (
                    metric(decode, "kv_cache_usage_perc") > 0
                    and metric(decode, "num_requests_running") == 0
                ):
                    assert time.monotonic() < deadline, decode.log()
                    if all(f.done() for f in futures):
                        assert [f.exception() for f in futures] == [None] * 3
                        break
                    time.sleep(0.01)
                else:
                    os.kill(prefill.proc.pid, signal.SIGKILL)
                    errors = []
                    for f in futures:
                        try:
                            f.result()
                        except openai.APIError as e:
                            errors.append(str(e))
            if errors is not None:
                break
        assert errors is not None, "the decode server was never seen waiting for KV"
        assert errors, "no request failed although the prefill server was killed"
        # The router sees the prefill worker's connection drop, the decode server its control
        # channel: either way the error names the prefill side.
        assert all("prefill" in e for e in errors), errors
        deadline = time.monotonic() + 60
        while metric(decode, "kv_cache_usage_perc") != 0.0:  # freed at its next step
            assert time.monotonic() < deadline, decode.log()
            time.sleep(0.05)
        assert "lost the prefill engine" in decode.log()
        assert decode.health() == 200  # the decode server lives on
    finally:
        router.stop()
        prefill.stop()
        decode.stop()


def test_unknown_transfer_backend_is_a_clear_error(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--disaggregation-mode", "decode", "--transfer", "carrier-pigeon"
    )
    assert server.proc.wait(120) == 2
    assert "carrier-pigeon" in server.log() and "mooncake" in server.log()
    server.stop()
