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
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pegboard.core.router.app import RouterApp, RouterSettings, make_proxy
from pegboard.core.router.http import Request, Response, error_response, json_response
from pegboard.core.router.proxy import (
    NoWorkerError,
    Proxy,
    RouteError,
    add_fields,
    forwarded_headers,
    route_error_response,
)
from pegboard.core.router.upstream import UpstreamClient, UpstreamError
from pegboard.sdk.routing import RequestBodyError, RouteRequest

log = logging.getLogger("pegboard.router.pd")

#: The bootstrap port a `--prefill URL` without one is assumed to listen on (SGLang's).
DEFAULT_BOOTSTRAP_PORT = 8998
#: Token ids, not text: a worker serving a model without a tokenizer (dummy weights) takes them.
WARMUP_BODY = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 1, "temperature": 0}).encode()
ROUTE_ERRORS = (RequestBodyError, RouteError, NoWorkerError)


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


def create_pd_app(settings: PDSettings) -> RouterApp:
    ports = dict(settings.prefill)
    client = UpstreamClient(settings.request_timeout)
    decode = make_proxy(_router_settings(settings, settings.decode), client, role="decode")
    metrics = decode.metrics
    prefill = make_proxy(_router_settings(settings, list(ports)), client, metrics, "prefill")

    async def routed(request: Request) -> Response:
        path, raw = request.path, request.body
        route_request = RouteRequest(path, raw=raw)
        headers = forwarded_headers(request.headers)
        try:
            p = prefill.choose(route_request)
            boot = {
                "bootstrap_host": urlsplit(p.url).hostname,
                "bootstrap_port": ports[p.url],
                "bootstrap_room": secrets.randbits(62),
            }
            p_raw = add_fields(raw, {**boot, "stream": False})  # its answer is dropped
            d_raw = add_fields(raw, boot)
        except ROUTE_ERRORS as e:
            return route_error_response(e)
        p_task = asyncio.create_task(_prefill(prefill, p, path, p_raw, headers))
        d_task = asyncio.create_task(decode.forward(route_request, d_raw, headers))
        await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
        if p_task.done() and not d_task.done() and (failed := p_task.result()) is not None:
            d_task.cancel()  # the decode half aborts; its pages are freed
            with contextlib.suppress(BaseException):
                await d_task
            return failed
        try:
            upstream = await d_task
        except ROUTE_ERRORS as e:
            p_task.cancel()
            return route_error_response(e)
        return decode.respond(upstream)

    def health() -> Response:
        ready = prefill.pool.ready and decode.pool.ready
        body = {
            "status": "ok" if ready else "unavailable",
            "healthy_prefill_workers": len(prefill.pool.healthy()),
            "healthy_decode_workers": len(decode.pool.healthy()),
        }
        return json_response(body, 200 if ready else 503)

    def workers() -> Response:
        return json_response(
            {
                "policy": decode.policy.name,
                "prefill": [
                    {**w.to_dict(), "bootstrap_port": ports[w.url]}
                    for w in prefill.pool.workers.values()
                ],
                "decode": [w.to_dict() for w in decode.pool.workers.values()],
            }
        )

    background = [prefill.pool.run, decode.pool.run]
    if settings.warmup:
        background.append(lambda: _warm_up(prefill))
    return RouterApp(client, [decode, prefill], metrics, routed, health, workers, background)


def _router_settings(settings: PDSettings, urls: list[str]) -> RouterSettings:
    return RouterSettings(
        workers=urls,
        policy=settings.policy,
        policy_options=settings.policy_options,
        health_interval=settings.health_interval,
    )


async def _prefill(proxy: Proxy, worker, path: str, raw: bytes, headers) -> Response | None:
    """Run the prefill half; its response body is dropped. Returns the response when the
    prefill worker refused the request (the client should see that error), else None."""
    worker.in_flight += 1
    try:
        upstream = await proxy.send(worker, path, raw, headers)
    except UpstreamError as e:
        log.warning("prefill worker %s failed: %s", worker.url, e)
        return error_response(502, f"prefill worker {worker.url} failed: {e}", "worker_error")
    finally:
        worker.in_flight -= 1
    if upstream.response.status != 200:
        log.warning("prefill worker %s answered %d", worker.url, upstream.response.status)
        return proxy.respond(upstream)
    return None


async def _warm_up(proxy: Proxy) -> None:
    """A prefill-only request to each prefill worker once it is healthy (first requests then
    do not pay for JIT compilation or graph capture)."""
    pending = set(proxy.pool.workers)
    headers = {"content-type": "application/json"}
    while pending:
        for worker in proxy.pool.healthy():
            if worker.url in pending:
                pending.discard(worker.url)
                try:
                    r = await proxy.client.request(
                        worker.url, "POST", "/v1/completions", WARMUP_BODY, headers
                    )
                    await r.read()
                    log.info("warm-up of prefill worker %s: %d", worker.url, r.status)
                except UpstreamError as e:
                    log.warning("warm-up of prefill worker %s failed: %s", worker.url, e)
        await asyncio.sleep(0.2)
