"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI schema
(valid and invalid) and sends them in-process to the app serving a loaded tiny engine; no
request may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.config import EngineConfig
from pegboard.core.server.app import create_app
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from schemathesis.checks import not_a_server_error


@pytest.fixture(scope="module")
def app(tiny_llama_dir):
    # A short context bounds every generated request's work (max_tokens may be huge).
    config = EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=48,
        metrics=["prometheus"],
    )  # fmt: skip
    engine = AsyncEngine.from_config(config)
    state = ServerState(ServerSettings(["tiny"], admin_token="t"), engine=engine)
    yield create_app(state)
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
