"""The router's HTTP application (plain Starlette: the request path is a handful of awaits).

- `POST /v1/completions`, `POST /v1/chat/completions`: routed by the active `router` plugin and
  forwarded (`proxy.py`); streams pass through.
- `GET /v1/models`: the first healthy worker's answer.
- `GET /health`: 200 when the pool is ready (a healthy worker), else 503.
- `GET /metrics`: Prometheus text (`metrics.py`); `GET /workers`: the pool and policy as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.router.metrics import RouterMetrics
from pegboard.core.router.pool import WorkerPool
from pegboard.core.router.proxy import (
    FORWARDED_HEADERS,
    ROUTED_PATHS,
    NoWorkerError,
    RouteError,
    forward,
    parse_request,
    relay,
)
from pegboard.core.server.errors import APIError
from pegboard.sdk.slots import SLOTS, PluginContext, Router
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class RouterSettings:
    """What `pegboard router` (or `serve --dp-size`) configures."""

    workers: list[str]
    policy: str = SLOTS["router"].default
    policy_options: dict = field(default_factory=dict)
    health_interval: float = 2.0
    min_ready: int = 1
    request_timeout: float = 600.0


def select_policy(
    settings: RouterSettings, plugins: PluginManager | None = None
) -> tuple[PluginManager, Router]:
    """The routing plugin created, set up and registered (a typo fails here, naming the
    available policies)."""
    pm = plugins or PluginManager()
    policy = pm.create("router", settings.policy, settings.policy_options)
    policy.setup(PluginContext(engine={"workers": list(settings.workers)}))
    pm.register(policy)
    return pm, policy


def create_router_app(settings: RouterSettings, plugins: PluginManager | None = None) -> Starlette:
    pm, policy = select_policy(settings, plugins)
    metrics = RouterMetrics(policy.name)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    timeout = httpx.Timeout(settings.request_timeout, connect=5.0)
    client = httpx.AsyncClient(limits=limits, timeout=timeout)
    pool = WorkerPool(
        settings.workers,
        client,
        interval=settings.health_interval,
        on_removed=policy.remove_worker,
        min_ready=settings.min_ready,
    )

    async def routed(request: Request) -> Response:
        raw = await request.body()
        try:
            route_request, headers = parse_request(request.url.path, raw, request.headers)
        except APIError as e:
            return e.response()
        stream = route_request.body.get("stream") is True
        try:
            upstream = await forward(
                client, pool, policy, pm.hook, metrics, route_request, raw, headers, stream
            )
        except NoWorkerError as e:
            return APIError(503, str(e)).response()
        except RouteError as e:
            return APIError(500, str(e)).response()
        if upstream.chunks is None:
            return Response(upstream.body, upstream.status, media_type=upstream.media_type)
        return StreamingResponse(relay(upstream, pool), media_type=upstream.media_type)

    async def models(request: Request) -> Response:
        for worker in pool.healthy():
            headers = {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k))}
            try:
                r = await client.get(worker.url + "/v1/models", headers=headers)
            except httpx.TransportError as e:
                pool.remove(worker, f"{type(e).__name__}: {e}")
                continue
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        return APIError(503, "no healthy worker").response()

    async def health(request: Request) -> Response:
        healthy = len(pool.healthy())
        status = "ok" if pool.ready else "unavailable"
        body = {"status": status, "healthy_workers": healthy, "workers": len(pool.workers)}
        return JSONResponse(body, status_code=200 if pool.ready else 503)

    async def workers(request: Request) -> Response:
        return JSONResponse(
            {
                "policy": policy.name,
                "policy_stats": policy.stats(),
                "workers": [w.to_dict() for w in pool.workers.values()],
            }
        )

    async def prometheus(request: Request) -> Response:
        text = metrics.render(pool, policy.stats())
        return Response(text, media_type=PROMETHEUS_CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        checks = asyncio.create_task(pool.run())
        try:
            yield
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
            await client.aclose()
            pm.unregister(policy)
            policy.close()

    app = Starlette(
        routes=[
            *(Route(path, routed, methods=["POST"]) for path in ROUTED_PATHS),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/workers", workers, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.policy = policy
    app.state.started = time.time()
    return app
