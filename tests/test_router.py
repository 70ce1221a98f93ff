"""`pegboard router` in front of real `pegboard serve` workers (tiny model, CPU): each policy
routes as specified, the official `openai` client streams through it, a killed worker loses no
request that had not started streaming, and without a healthy worker it answers 503."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from pegboard.core.cli.main import main
from test_server_process import ServerProcess, free_port, offline_texts, stream_completion

pytestmark = pytest.mark.slow
NAMED = ("--served-model-name", "tiny")
SYSTEM = "You are a helpful assistant. Answer briefly and politely, in one line. "


class RouterProcess:
    """A real `pegboard router` subprocess on 127.0.0.1 and a free port."""

    def __init__(self, workers: list[str], log_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"router-{self.port}.log"
        cmd = [sys.executable, "-m", "pegboard.core.cli.main", "router", "--port", str(self.port)]
        for w in workers:
            cmd += ["--worker", w]
        self._log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*cmd, *flags], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> dict:
        return httpx.get(self.url + "/workers", timeout=10).json()

    def wait_for(self, predicate, what: str, timeout: float = 120.0):
        """Poll the router until `predicate(health status, /workers)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
                if predicate(status, self.workers()):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"router: {what} not seen after {timeout} s:\n{self.log()}")

    def wait_healthy(self, n: int) -> RouterProcess:
        return self.wait_for(
            lambda s, w: s == 200 and sum(x["healthy"] for x in w["workers"]) == n,
            f"{n} healthy workers",
        )

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def routed(self) -> list[int]:
        return [w["routed"] for w in self.workers()["workers"]]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def workers(tiny_llama_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("router-workers")
    servers = [ServerProcess(tiny_llama_dir, logs, *NAMED) for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def router_for(workers, tmp_path):
    started: list[RouterProcess] = []

    def start(*flags: str, urls: list[str] | None = None, healthy: int | None = None):
        urls = urls if urls is not None else [w.url for w in workers]
        router = RouterProcess(urls, tmp_path, "--health-interval", "0.2", *flags)
        started.append(router)
        return router.wait_healthy(len(urls) if healthy is None else healthy)

    yield start
    for r in started:
        assert r.stop() == 0, r.log()


@pytest.fixture(scope="module")
def expected(tiny_llama_dir) -> dict[str, str]:
    prompts = [SYSTEM + q for q in ("What is red?", "Name a fruit.", "Say hi.", "Count.")]
    return offline_texts(tiny_llama_dir, prompts, max_tokens=8)


def test_openai_client_streams_through_the_router(router_for, expected):
    router = router_for("--router-policy", "round_robin")
    client = router.client()
    for prompt, text in expected.items():
        chunks = list(
            client.completions.create(
                model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
            )
        )
        assert len(chunks) > 1  # streamed, not one body
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert sum(1 for c in chat if c.choices and c.choices[0].delta.content) >= 1
    prompt, text = next(iter(expected.items()))
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert plain.choices[0].text == text


def test_round_robin_alternates_between_the_workers(router_for):
    router = router_for("--router-policy", "round_robin")
    for _ in range(4):
        router.client().completions.create(model="tiny", prompt="hello", max_tokens=1)
    assert router.routed() == [2, 2]


async def _hold_open(client: openai.AsyncOpenAI, prompt: str):
    """A long streamed request, returned once its first chunk arrived (it is then in flight
    on its worker until it is read to the end), with a task that reads the rest."""
    started = asyncio.Event()
    task = asyncio.create_task(
        stream_completion(
            client, prompt, started, max_tokens=400, temperature=0,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiting.cancel()
        await task  # it ended without a chunk: raise its error
        raise AssertionError(f"the stream of {prompt!r} ended without a chunk")
    return task


def test_least_load_avoids_the_worker_holding_a_request(router_for):
    router = router_for("--router-policy", "least_load")

    async def run():
        client = router.async_client()
        long = await _hold_open(client, "a long one")
        busy = [w["in_flight"] for w in router.workers()["workers"]].index(1)
        before = router.routed()
        await client.completions.create(model="tiny", prompt="short", max_tokens=1)
        after = router.routed()
        await long
        return busy, [a - b for a, b in zip(after, before)]

    busy, delta = asyncio.run(run())
    assert delta[busy] == 0 and sum(delta) == 1


def test_cache_aware_keeps_a_shared_prefix_on_one_worker_until_the_load_guard_trips(router_for):
    router = router_for(
        "--router-policy", "cache_aware",
        "--cache-aware-balance-abs-threshold", "1",
        "--cache-aware-balance-rel-threshold", "1.5",
    )  # fmt: skip
    client = router.client()
    for q in ("one", "two", "three"):  # one at a time: no load gap, the prefix decides
        client.completions.create(model="tiny", prompt=SYSTEM + q, max_tokens=2)
    counts = router.routed()
    assert sorted(counts) == [0, 3]
    home = counts.index(3)

    async def run():
        aclient = router.async_client()
        first = await _hold_open(aclient, SYSTEM + "first")  # load: home 1, other 0
        second = await _hold_open(aclient, SYSTEM + "second")  # gap 1: still home
        after_two = router.routed()
        third = await _hold_open(aclient, SYSTEM + "third")  # gap 2 > 1: the guard trips
        after_three = router.routed()
        await asyncio.gather(first, second, third)
        return after_two, after_three

    after_two, after_three = asyncio.run(run())
    assert after_two[home] == 5 and after_two[1 - home] == 0
    assert after_three[1 - home] == 1
    stats = router.workers()["policy_stats"]
    assert stats["balance_routed"] == 1 and stats["cache_routed"] == 4
    metrics = httpx.get(router.url + "/metrics").text
    assert "pegboard_router:cache_hit_estimate" in metrics
    assert 'pegboard_router:worker_in_flight{worker="' in metrics


def test_a_killed_worker_loses_no_request_that_had_not_started_streaming(
    workers, tmp_path, expected
):
    # The last test of the module to use the workers: it takes the second one as its victim
    # (one server start fewer); a later user of `workers` would find only one.
    victim = workers.pop()
    # Checks every 60 s: only the requests themselves can find out that the victim died.
    router = RouterProcess(
        [workers[0].url, victim.url], tmp_path, "--router-policy", "round_robin",
        "--health-interval", "60",
    )  # fmt: skip
    try:
        router.wait_healthy(2)
        victim.proc.send_signal(signal.SIGSTOP)  # it accepts connections but answers nothing

        async def run():
            client = router.async_client()
            tasks = [
                asyncio.create_task(stream_completion(client, p, max_tokens=8, temperature=0))
                for p in expected
            ]
            # Half of them are now waiting on the frozen victim, none has a byte yet.
            while router.workers()["workers"][1]["in_flight"] < len(tasks) // 2:
                await asyncio.sleep(0.05)
            victim.proc.kill()
            return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert [text for text, _ in results] == list(expected.values())
        state = router.workers()["workers"]
        assert state[1]["healthy"] is False and state[1]["failures"] == len(expected) // 2
        metrics = httpx.get(router.url + "/metrics").text
        assert f'pegboard_router:requests_retried_total{{worker="{victim.url}"}} 2.0' in metrics
    finally:
        victim.proc.kill()
        victim.stop()
        assert router.stop() == 0, router.log()


def test_without_a_healthy_worker_the_router_answers_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    router = RouterProcess([dead], tmp_path, "--health-interval", "0.2")
    try:
        router.wait_for(lambda s, w: s == 503, "health 503", timeout=60)
        r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "no healthy worker" in r.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            router.client().completions.create(model="tiny", prompt="x", max_tokens=1)
        assert e.value.status_code == 503
    finally:
        assert router.stop() == 0, router.log()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["router"], "--worker"),
        (["router", "--worker", "localhost:8000"], "expected a base URL"),
        (["router", "--worker", "https://10.0.0.1:8000"], "plain http"),
        (["router", "--worker", "http://127.0.0.1:1", "--worker", "http://127.0.0.1:1"], "twice"),
        (["router", "--worker", "http://127.0.0.1:1", "--health-interval", "0"], "positive"),
        (["router", "--worker", "http://127.0.0.1:1", "--router-policy", "nope"], "round_robin"),
        (
            [
                "router",
                "--worker",
                "http://127.0.0.1:1",
                "--router-policy",
                "cache_aware",
                "--cache-aware-cache-threshold",
                "2",
            ],
            "cache_threshold",
        ),  # fmt: skip
        (["serve", "--dp-size", "0"], "--dp-size must be at least 1"),
        (["serve", "--dp-size", "2", "--device", "cuda:1"], "--device"),
        (["serve", "--dp-size", "2", "--router-policy", "nope"], "unknown router 'nope'"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err
