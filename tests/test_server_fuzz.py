"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI schema
(valid and invalid) and sends them in-process to the app serving a loaded tiny engine, with
the admin token so that swaps are fuzzed too; no request may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.config import EngineConfig
from pegboard.core.server.app import create_app
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

ADMIN = {"Authorization": "Bearer t"}


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


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(api_schema):
    ops = operations(api_schema)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/health"}
    for op in ops:
        # Invalid inputs exist only for operations that take some.
        takes_input = bool(len(op.body) or len(op.path_parameters))
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * takes_input:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases every run: CI failures reproduce
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                case.call_and_validate(headers=ADMIN, checks=[not_a_server_error])

            check()
