"""A model served without a tokenizer (dummy weights from a bare config, as the benchmarks and
the PD router's warm-up use it) takes token ids; text is the client's error, a 400 that says
so, not a 500 — and the server goes on serving."""

from __future__ import annotations

import shutil

import pytest
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.config import EngineConfig
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.router.pd import WARMUP_BODY
from pegboard.core.server.app import create_app
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def http(tiny_llama_dir, tmp_path_factory):
    bare = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_llama_dir / "config.json", bare / "config.json")
    config = EngineConfig(model=str(bare), load_format="dummy", dtype="float32", device="cpu")
    engine = AsyncEngine.from_config(config, PluginManager())
    state = ServerState(ServerSettings(["tiny"]), engine=engine)
    with TestClient(create_app(state)) as client:
        yield client


def test_text_to_a_model_without_a_tokenizer_is_a_400_and_token_ids_work(http):
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "send token ids" in error["message"] and error["param"] == "prompt"
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400, chat.text
    ok = http.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_the_pd_routers_warm_up_request_is_served_by_a_model_without_a_tokenizer(http):
    r = http.post(
        "/v1/completions", content=WARMUP_BODY, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
