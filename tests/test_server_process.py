"""`pegboard serve` as a process: a helper the server tests share (`ServerProcess`), and the
process-level behaviour: listening before the model is loaded, exit status on a bad model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ADMIN_TOKEN = "admin-secret"
API_KEY = "client-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `pegboard serve` subprocess on 127.0.0.1 and a free port, logging to a file."""

    def __init__(
        self, model_dir: Path | str, log_dir: Path, *flags: str, env: dict | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "pegboard.core.cli.main", "serve", "--model", str(model_dir)]
        cmd += ["--port", str(self.port), "--dtype", "float32", "--device", "cpu", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("PEGBOARD_API_KEY", None)
        env.pop("PEGBOARD_ADMIN_TOKEN", None)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> int | None:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 900.0) -> ServerProcess:
        """Wait for /health 200 (the timeout only bounds a hang: a busy 2-core machine may take
        minutes to load and warm up even the tiny model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.health() == 200:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def client(self, api_key: str = API_KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def async_client(self, api_key: str = API_KEY, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def admin(
        self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kw
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def stop(self, timeout: float = 300.0) -> int:
        """SIGTERM, then the exit status (killing it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def offline_texts(model_dir: Path, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Greedy completions of the offline engine (`LLM.generate`), the server's oracle."""
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    finally:
        llm.close()
    return {p: o.text for p, o in zip(prompts, outs)}


async def stream_completion(
    client: openai.AsyncOpenAI, prompt: str, started: asyncio.Event | None = None, **kw
) -> tuple[str, str]:
    """A streamed completion's text and finish reason; sets `started` at the first chunk."""
    stream = await client.completions.create(model="tiny", prompt=prompt, stream=True, **kw)
    text, reason = "", None
    async for chunk in stream:
        if started is not None:
            started.set()
        if chunk.choices:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


@pytest.mark.slow
def test_listens_before_the_model_is_loaded_and_then_serves(tiny_llama_dir, tmp_path):
    server = ServerProcess(tiny_llama_dir, tmp_path)
    try:
        statuses = []
        deadline = time.monotonic() + 900  # bounds a hang only
        while time.monotonic() < deadline and 200 not in statuses:
            if server.proc.poll() is not None:
                pytest.fail(server.log())
            status = server.health()
            if status is not None:
                statuses.append(status)
                if status == 503:
                    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"})
                    if r.status_code == 503:
                        assert r.json()["error"]["type"] == "service_unavailable"
            time.sleep(0.02)
        # Loading a model takes longer than binding a socket: /health said 503 first.
        assert statuses[0] == 503, statuses[:5]
        assert statuses[-1] == 200
        out = server.client().completions.create(
            model=str(tiny_llama_dir), prompt="a", max_tokens=2
        )
        assert out.usage.completion_tokens == 2
    finally:
        assert server.stop() == 0, server.log()


def test_a_model_that_cannot_load_exits_with_status_1(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    server = ServerProcess(empty, tmp_path)
    assert server.proc.wait(600) == 1
    assert "not-a-model" in server.log()
