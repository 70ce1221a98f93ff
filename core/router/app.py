"""The router's HTTP application (served by `http.py`; the request path is a handful of awaits).

- `POST /v1/completions`, `POST /v1/chat/completions`: routed by the active `router` plugin and
  forwarded (`proxy.py`); streams pass through.
- `GET /v1/models`: the first healthy worker's answer.
- `GET /health`: 200 when the pool is ready (a healthy worker), else 503.
- `GET /metrics`: Prometheus text (`metrics.py`); `GET /workers`: the pool and policy as JSON.

`RouterApp` holds the route table and the start/stop work both routers share; the plain router
(`create_router_app`) and the PD router (`pd.py`) differ in how they route and report health.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pegboard.core.plugin_manager import PluginManager
from pegboard.core.router.http import Request, Response, error_response, json_response
from pegboard.core.router.metrics import RouterMetrics
from pegboard.core.router.pool import WorkerPool
from pegboard.core.router.proxy import (
    ROUTED_PATHS,
    NoWorkerError,
    Proxy,
    RouteError,
    forwarded_headers,
    route_error_response,
)
from pegboard.core.router.upstream import UpstreamClient, UpstreamError
from pegboard.sdk.routing import RequestBodyError, RouteRequest
from pegboard.sdk.slots import SLOTS, PluginContext, Router

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


@dataclass
class RouterApp:
    """What both routers share: the route table, `/metrics`, `/v1/models`, and the background
    work (health checks, warm-up) started before the port opens and stopped after it closed.
    `routed` answers the routed POSTs, `health` and `workers` the GETs of the same names."""

    client: UpstreamClient
    proxies: list[Proxy]  # the first one's workers answer /v1/models, its policy's stats count
    metrics: RouterMetrics
    routed: Callable[[Request], Awaitable[Response]]
    health: Callable[[], Response]
    workers: Callable[[], Response]
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path in ROUTED_PATHS:
            if method != "POST":
                return error_response(405, f"{method} {path}: only POST")
            return await self.routed(request)
        if method != "GET":
            return error_response(404 if path not in GET_PATHS else 405, f"{method} {path}")
        if path == "/health":
            return self.health()
        if path == "/workers":
            return self.workers()
        if path == "/metrics":
            text = self.metrics.render(
                [p.pool for p in self.proxies], self.proxies[0].policy.stats()
            )
            return Response(200, text, PROMETHEUS_CONTENT_TYPE)
        if path == "/v1/models":
            return await self.models(request)
        return error_response(404, f"no route {path}")

    async def models(self, request: Request) -> Response:
        proxy = self.proxies[0]
        for worker in proxy.pool.healthy():
            try:
                r = await self.client.request(
                    worker.url, "GET", "/v1/models", headers=forwarded_headers(request.headers)
                )
                return Response(r.status, await r.read(), r.media_type)
            except UpstreamError as e:
                proxy.pool.remove(worker, str(e))
        return error_response(503, f"no healthy {proxy.role + ' ' if proxy.role else ''}worker")

    async def startup(self) -> None:
        self._tasks = [asyncio.create_task(run()) for run in self.background]

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
        for proxy in self.proxies:
            proxy.plugins.unregister(proxy.policy)
            proxy.policy.close()


GET_PATHS = ("/health", "/workers", "/metrics", "/v1/models")


def make_proxy(
    settings: RouterSettings,
    client: UpstreamClient,
    metrics: RouterMetrics | None = None,
    role: str = "",
) -> Proxy:
    """A pool of `settings.workers` with its own instance of the policy."""
    pm, policy = select_policy(settings, PluginManager())
    pool = WorkerPool(
        settings.workers,
        client,
        interval=settings.health_interval,
        on_removed=policy.remove_worker,
        min_ready=settings.min_ready,
    )
    return Proxy(client, pool, pm, policy, metrics or RouterMetrics(policy.name), role)


def create_router_app(settings: RouterSettings) -> RouterApp:
    client = UpstreamClient(settings.request_timeout)
    proxy = make_proxy(settings, client)
    pool, policy = proxy.pool, proxy.policy

    async def routed(request: Request) -> Response:
        route_request = RouteRequest(request.path, raw=request.body)
        try:
            upstream = await proxy.forward(
                route_request, request.body, forwarded_headers(request.headers)
            )
        except (RequestBodyError, RouteError, NoWorkerError) as e:
            return route_error_response(e)
        return proxy.respond(upstream)

    def health() -> Response:
        body = {
            "status": "ok" if pool.ready else "unavailable",
            "healthy_workers": len(pool.healthy()),
            "workers": len(pool.workers),
        }
        return json_response(body, 200 if pool.ready else 503)

    def workers() -> Response:
        return json_response(
            {
                "policy": policy.name,
                "policy_stats": policy.stats(),
                "workers": [w.to_dict() for w in pool.workers.values()],
            }
        )

    return RouterApp(client, [proxy], proxy.metrics, routed, health, workers, [pool.run])
