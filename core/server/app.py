"""The FastAPI application: OpenAI routes, health, Prometheus metrics and (with an admin token)
the admin API. `create_app(state)` builds it around a `ServerState`; its lifespan starts
loading the engine and shuts it down."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from pegboard.core.server import admin, chat, completions, load, profiler
from pegboard.core.server.errors import APIError, install_error_handlers
from pegboard.core.server.lifecycle import ServerState
from pegboard.core.server.limits import BodySizeLimit
from pegboard.core.server.protocol import ModelCard, ModelList
from pegboard.core.server.security import require_api_key

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(state: ServerState) -> FastAPI:
    """The HTTP application serving `state`'s engine (loaded in the background at startup if
    `state` has none yet)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(
        title="pegboard",
        summary="OpenAI-compatible API of the pegboard inference engine",
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=lambda: state.settings.max_request_bytes)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(load.router)  # GET /load, for routers (core/router)
    if state.settings.admin_token:
        app.include_router(admin.router)
        app.include_router(profiler.router)  # /start_profile, /stop_profile

    @app.get("/health", tags=["server"])
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while it loads, after it failed, or while draining."""
        if state.ready:
            return JSONResponse({"status": "ok"})
        if state.draining:
            status = "draining"
        elif state.load_error is not None or (state.engine and state.engine.error):
            status = "failed"
        else:
            status = "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        tags=["openai"],
        dependencies=[Depends(require_api_key)],
    )
    async def models() -> ModelList:
        """The served model (under each of its served names)."""
        engine = state.require_engine()
        return ModelList(
            data=[
                ModelCard(
                    id=name,
                    created=app.state.created,
                    root=str(engine.engine.model_dir),
                    max_model_len=engine.engine.info.max_model_len,
                )
                for name in state.settings.served_model_names
            ]
        )

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition of the `prometheus` exporter's registry."""
        if state.engine is None:
            raise APIError(503, "the model is loading; no metrics yet")
        exporter = prometheus_exporter(state)
        if exporter is None:
            raise APIError(
                404, "the prometheus metrics exporter is not enabled (--metrics prometheus)"
            )
        return Response(exporter.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    return app


def prometheus_exporter(state: ServerState):
    """The active metrics plugin named `prometheus` (anything with a `render()` giving the
    text exposition may take that name), or None."""
    for plugin in state.engine.engine.plugins.active_all("metrics"):
        if plugin.name == "prometheus" and callable(getattr(plugin, "render", None)):
            return plugin
    return None
