"""`pegboard router --pd --prefill URL [PORT] --decode URL`: one OpenAI-compatible address in
front of prefill and decode engines (`pegboard serve --disaggregation-mode prefill|decode`).

Per request the router draws a bootstrap room, picks a prefill and a decode worker (each pool
with its own instance of the `--router-policy` plugin), and sends the request to both with
`bootstrap_host`/`bootstrap_port`/`bootstrap_room` added (SGLang's fields): the prefill engine
computes the prompt's KV and first token, the decode engine receives them and generates. The
client gets the decode worker's response, streamed through. A prefill worker that rejects the
request (4xx/5xx) before the decode worker answered ends it with the prefill's error at once.
At start every prefill worker gets a prefill-only warm-up request once it is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.router.app import (
    PROMETHEUS_CONTENT_TYPE,
    ROUTED_PATHS,
    RouterSettings,
    select_policy,
)
from pegboard.core.router.metrics import RouterMetrics
from pegboard.core.router.pool import WorkerPool
from pegboard.core.router.proxy import (
    FORWARDED_HEADERS,
    NoWorkerError,
    RouteError,
    Upstream,
    _send,
    choose,
    forward,
    relay,
)
from pegboard.core.server.errors import APIError
from pegboard.sdk.routing import RouteRequest, prompt_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("pegboard.router.pd")

#: The bootstrap port a `--prefill URL` without one is assumed to listen on (SGLang's).
DEFAULT_BOOTSTRAP_PORT = 8998
WARMUP_BODY = {"prompt": "warm up", "max_tokens": 1, "temperature": 0}


@dataclass
class PDSettings:
    """What `pegboard router --pd` configures: prefill workers with their bootstrap ports."""

    prefill: list[tuple[str, int]]
    decode: list[str]
    policy: str = RouterSettings.policy
    policy_options: dict = field(default_factory=dict)
    health_interval: float = 2.0
    request_timeout: float = 600.0
    warmup: bool = True


def create_pd_app(settings: PDSettings) -> Starlette:
    ports = dict(settings.prefill)
    prefill_urls = list(ports)
    pm_p, policy_p = select_policy(_router_settings(settings, prefill_urls), PluginManager())
    pm_d, policy_d = select_policy(_router_settings(settings, settings.decode), PluginManager())
    metrics = RouterMetrics(policy_d.name)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    client = httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(settings.request_timeout, connect=5.0)
    )
    prefill = WorkerPool(prefill_urls, client, settings.health_interval, policy_p.remove_worker)
    decode = WorkerPool(settings.decode, client, settings.health_interval, policy_d.remove_worker)

    async def routed(request: Request) -> Response:
        path = request.url.path
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return APIError(400, f"the request body is not valid JSON: {e}").response()
        if not isinstance(body, dict):
            return APIError(400, "the request body must be a JSON object").response()
        route_request = RouteRequest(path, prompt_key(body.get(ROUTED_PATHS[path])), body)
        headers = {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}
        try:
            healthy = prefill.healthy()
            if not healthy:
                raise NoWorkerError(f"no healthy prefill worker; workers: {', '.join(ports)}")
            p = choose(policy_p, pm_p.hook, route_request, healthy)
        except NoWorkerError as e:
            return APIError(503, str(e)).response()
        except RouteError as e:
            return APIError(500, str(e)).response()
        boot = {
            "bootstrap_host": urlsplit(p.url).hostname,
            "bootstrap_port": ports[p.url],
            "bootstrap_room": secrets.randbits(62),
        }
        stream = body.get("stream") is True
        p_raw = json.dumps({**body, **boot, "stream": False}).encode()
        d_raw = json.dumps({**body, **boot}).encode()
        p_task = asyncio.create_task(_prefill(client, p, path, p_raw, headers))
        d_task = asyncio.create_task(
            forward(
                client, decode, policy_d, pm_d.hook, metrics, route_request, d_raw, headers, stream
            )
        )
        await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
        if p_task.done() and not d_task.done() and (failed := p_task.result()) is not None:
            d_task.cancel()  # the decode half aborts; its pages are freed
            with contextlib.suppress(BaseException):
                await d_task
            return Response(failed.body, failed.status, media_type=failed.media_type)
        try:
            upstream = await d_task
        except NoWorkerError as e:
            p_task.cancel()
            return APIError(
                503, str(e).replace("healthy worker", "healthy decode worker")
            ).response()
        except RouteError as e:
            p_task.cancel()
            return APIError(500, str(e)).response()
        if upstream.chunks is None:
            return Response(upstream.body, upstream.status, media_type=upstream.media_type)
        return StreamingResponse(relay(upstream, decode), media_type=upstream.media_type)

    async def health(request: Request) -> Response:
        ready = prefill.ready and decode.ready
        body = {
            "status": "ok" if ready else "unavailable",
            "healthy_prefill_workers": len(prefill.healthy()),
            "healthy_decode_workers": len(decode.healthy()),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def workers(request: Request) -> Response:
        return JSONResponse(
            {
                "policy": policy_d.name,
                "prefill": [
                    {**w.to_dict(), "bootstrap_port": ports[w.url]}
                    for w in prefill.workers.values()
                ],
                "decode": [w.to_dict() for w in decode.workers.values()],
            }
        )

    async def models(request: Request) -> Response:
        for worker in decode.healthy():
            try:
                r = await client.get(worker.url + "/v1/models")
            except httpx.TransportError:
                continue
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        return APIError(503, "no healthy decode worker").response()

    async def prometheus(request: Request) -> Response:
        return Response(
            metrics.render(decode, policy_d.stats()), media_type=PROMETHEUS_CONTENT_TYPE
        )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        tasks = [asyncio.create_task(prefill.run()), asyncio.create_task(decode.run())]
        if settings.warmup:
            tasks.append(asyncio.create_task(_warm_up(client, prefill)))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            for pm, policy in ((pm_p, policy_p), (pm_d, policy_d)):
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
    app.state.prefill, app.state.decode = prefill, decode
    return app


def _router_settings(settings: PDSettings, urls: list[str]) -> RouterSettings:
    return RouterSettings(
        workers=urls, policy=settings.policy, policy_options=settings.policy_options
    )


async def _prefill(client, worker, path: str, raw: bytes, headers) -> Upstream | None:
    """Run the prefill half; its response body is dropped. Returns the response when the
    prefill worker refused the request (the client should see that error), else None."""
    worker.in_flight += 1
    worker.routed += 1
    try:
        upstream = await _send(client, worker, path, raw, headers, stream=False)
    except httpx.TransportError as e:
        log.warning("prefill worker %s failed: %s", worker.url, e)
        body = {"error": {"message": f"prefill worker {worker.url} failed: {e}", "code": 502}}
        return Upstream(worker, 502, "application/json", json.dumps(body).encode())
    finally:
        worker.in_flight -= 1
    if upstream.status != 200:
        log.warning("prefill worker %s answered %d", worker.url, upstream.status)
        return upstream
    return None


async def _warm_up(client: httpx.AsyncClient, pool: WorkerPool) -> None:
    """A prefill-only request to each prefill worker once it is healthy (first requests then
    do not pay for JIT compilation or graph capture)."""
    pending = set(pool.workers)
    while pending:
        for worker in pool.healthy():
            if worker.url in pending:
                pending.discard(worker.url)
                try:
                    r = await client.post(worker.url + "/v1/completions", json=WARMUP_BODY)
                    log.info("warm-up of prefill worker %s: %d", worker.url, r.status_code)
                except httpx.HTTPError as e:
                    log.warning("warm-up of prefill worker %s failed: %s", worker.url, e)
        await asyncio.sleep(0.2)
