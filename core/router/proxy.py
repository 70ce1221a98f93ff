"""Forwarding one request: route it, send it, retry it elsewhere while nothing has been sent.

A request is retried on another worker when its worker cannot take it: the connection fails,
the worker answers 503 (loading, draining), or it dies before the first byte of the response
body. Until then the client has received nothing, so the retry is invisible. Once bytes flow,
the stream passes through untouched; if the worker dies mid-stream, the client gets an error
event (OpenAI's stream error shape) and the stream ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import httpx
from pegboard.core.router.metrics import RouterMetrics
from pegboard.core.router.pool import Worker, WorkerPool
from pegboard.core.server.errors import APIError
from pegboard.sdk.routing import RouteRequest, prompt_key
from pegboard.sdk.slots import Router

log = logging.getLogger("pegboard.router")

#: Request headers passed to the worker (auth and content negotiation); others are the hop's.
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "x-request-id")


class RouteError(RuntimeError):
    """The routing policy failed or returned something that is not one of the workers."""


class NoWorkerError(RuntimeError):
    """No healthy worker is left for this request."""


@dataclass
class Upstream:
    """A worker's response: status, content type and, for a stream, its first chunk and the
    rest; for a plain response, the whole body."""

    worker: Worker
    status: int
    media_type: str | None
    body: bytes = b""
    response: httpx.Response | None = None
    chunks: AsyncIterator[bytes] | None = None


#: The request field each routed endpoint is keyed by.
ROUTED_PATHS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


def parse_request(path: str, raw: bytes, headers) -> tuple[RouteRequest, dict[str, str]]:
    """The `RouteRequest` of a routed endpoint's body and the headers to forward; `APIError`
    400 for a body that is not a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    forwarded = {k: v for k in FORWARDED_HEADERS if (v := headers.get(k)) is not None}
    return RouteRequest(path, prompt_key(body.get(ROUTED_PATHS[path])), body), forwarded


def choose(policy: Router, hook, request: RouteRequest, workers: list[Worker]) -> Worker:
    """The worker the policy picks, checked: it must be one of `workers`."""
    by_url = {w.url: w for w in workers}
    try:
        url = hook.route(request=request, workers=[w.load() for w in workers])
    except Exception as e:
        raise RouteError(f"router policy {policy.name!r} failed: {type(e).__name__}: {e}") from e
    if url not in by_url:
        raise RouteError(
            f"router policy {policy.name!r} returned {url!r}, not one of the healthy workers "
            f"{sorted(by_url)}"
        )
    return by_url[url]


async def forward(
    client: httpx.AsyncClient,
    pool: WorkerPool,
    policy: Router,
    hook,
    metrics: RouterMetrics,
    request: RouteRequest,
    raw: bytes,
    headers: dict[str, str],
    stream: bool,
) -> Upstream:
    """Send the request to the worker the policy picks; on a worker that cannot take it, mark
    it and try the next one. Raises `NoWorkerError` when none is left."""
    tried: list[str] = []
    while True:
        workers = pool.healthy(exclude=tried)
        if not workers:
            metrics.unavailable.inc()
            raise NoWorkerError(
                "no healthy worker"
                + (f" (tried {', '.join(tried)})" if tried else "")
                + f"; workers: {', '.join(pool.workers)}"
            )
        worker = choose(policy, hook, request, workers)
        worker.in_flight += 1
        worker.routed += 1
        metrics.routed.labels(worker.url).inc()
        try:
            upstream = await _send(client, worker, request.path, raw, headers, stream)
        except httpx.TransportError as e:
            worker.in_flight -= 1
            worker.failures += 1
            pool.remove(worker, f"{type(e).__name__} under a request: {e}")
        else:
            if upstream.status != 503:
                if upstream.chunks is None:
                    worker.in_flight -= 1
                return upstream
            worker.in_flight -= 1
            pool.remove(worker, "answered 503")
        metrics.retried.labels(worker.url).inc()
        tried.append(worker.url)
        request = replace(request, retry_of=tuple(tried))


async def _send(
    client: httpx.AsyncClient,
    worker: Worker,
    path: str,
    raw: bytes,
    headers: dict[str, str],
    stream: bool,
) -> Upstream:
    req = client.build_request("POST", worker.url + path, content=raw, headers=headers)
    response = await client.send(req, stream=True)
    media_type = response.headers.get("content-type")
    if not stream or response.status_code != 200:
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Upstream(worker, response.status_code, media_type, body)
    chunks = response.aiter_raw()
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except BaseException:
        await response.aclose()
        raise
    return Upstream(worker, 200, media_type, first, response, chunks)


async def relay(upstream: Upstream, pool: WorkerPool) -> AsyncIterator[bytes]:
    """The stream's bytes, first chunk included; closes the worker's response and releases
    the worker's in-flight count however the stream ends (client gone included)."""
    worker = upstream.worker
    try:
        if upstream.body:
            yield upstream.body
        async for chunk in upstream.chunks:
            yield chunk
    except httpx.TransportError as e:
        worker.failures += 1
        pool.remove(worker, f"{type(e).__name__} mid-stream: {e}")
        error = {"message": f"worker {worker.url} failed mid-stream: {e}", "type": "worker_error"}
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
    finally:
        worker.in_flight -= 1
        await upstream.response.aclose()
