"""A plugin that raises fails the requests it was serving — a 500 with the plugin's message,
or an error event in a stream — and the server goes on serving. Needs a faulty plugin, so the
app runs in-process with a plugin manager that has one added."""

from __future__ import annotations

import json

import pytest
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.config import EngineConfig
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.server.app import create_app
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from pegboard.plugins.sampling.standard import StandardSampler
from starlette.testclient import TestClient

MARKER_TOP_K = 13  # requests with this top_k make the sampler raise


class ExplodingSampler(StandardSampler):
    """The standard sampler, except that it raises for a request with `top_k == 13`."""

    name = "exploding"

    def sample(self, logits, requests):
        if any(r.params.top_k == MARKER_TOP_K for r in requests):
            raise RuntimeError("sampler exploded on purpose")
        return super().sample(logits, requests)


@pytest.fixture(scope="module")
def http(tiny_llama_dir):
    plugins = PluginManager()
    plugins.add(ExplodingSampler)
    config = EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", device="cpu", sampler="exploding",
        metrics=["prometheus"],
    )  # fmt: skip
    engine = AsyncEngine.from_config(config, plugins)
    state = ServerState(ServerSettings(["tiny"]), engine=engine)
    with TestClient(create_app(state)) as client:
        yield client


def test_a_failing_plugin_is_a_500_with_its_message_and_the_server_goes_on(http):
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "top_k": MARKER_TOP_K})
    assert r.status_code == 500
    assert "sampler exploded on purpose" in r.json()["error"]["message"]
    ok = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert http.get("/health").status_code == 200


def test_a_failing_plugin_ends_a_stream_with_an_error_event(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "top_k": MARKER_TOP_K}  # fmt: skip
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "sampler exploded on purpose" in error["message"]
    ok = http.post("/v1/chat/completions", json={**body, "top_k": 0})
    assert ok.text.rstrip().endswith("data: [DONE]") and '"error"' not in ok.text
