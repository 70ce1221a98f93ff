"""Forwarding one request: route it, send it, retry it elsewhere while nothing has been sent.

A request is retried on another worker when its worker cannot take it: the connection fails,
the worker answers 503 (loading, draining), or it dies before the first byte of the response
body. Until then the client has received nothing, so the retry is invisible. Once bytes flow,
the stream passes through untouched (the worker's SSE bytes, not re-parsed); if the worker dies
mid-stream, the client gets an error event (OpenAI's stream error shape) and the stream ends.

The body is forwarded as it came: it is parsed only if the routing policy reads it
(`RouteRequest`), and PD routing adds its fields without re-encoding it (`add_fields`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pegboard.core.plugin_manager import PluginManager
from pegboard.core.router.http import LAST_CHUNK, Response, error_response, frame
from pegboard.core.router.metrics import RouterMetrics
from pegboard.core.router.pool import Worker, WorkerPool
from pegboard.core.router.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from pegboard.sdk.routing import KEY_FIELDS, RequestBodyError, RouteRequest
from pegboard.sdk.slots import Router

log = logging.getLogger("pegboard.router")

#: Request headers passed to the worker (auth and content negotiation); others are the hop's.
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
#: The endpoints the router routes (POST).
ROUTED_PATHS = tuple(KEY_FIELDS)


class RouteError(RuntimeError):
    """The routing policy failed or returned something that is not one of the workers."""


class NoWorkerError(RuntimeError):
    """No healthy worker is left for this request."""


@dataclass
class Upstream:
    """A worker's response: for a stream its first chunk and the rest (`chunks`); for a plain
    response the whole body."""

    worker: Worker
    response: UpstreamResponse
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None


def forwarded_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k in FORWARDED_HEADERS if (v := headers.get(k)) is not None}


def add_fields(raw: bytes, fields: dict) -> bytes:
    """`raw` (a JSON object's text) with `fields` appended at its end, where they win over keys
    of the same name (JSON parsers keep the last); the rest is not re-encoded."""
    body = raw.rstrip()
    if not body.endswith(b"}"):
        raise RequestBodyError("the request body must be a JSON object")
    inner = body[:-1].rstrip()
    extra = json.dumps(fields, separators=(",", ":")).encode()[1:-1]
    return inner + (b"" if inner.endswith(b"{") else b",") + extra + b"}"


def choose(policy: Router, hook, request: RouteRequest, workers: list[Worker]) -> Worker:
    """The worker the policy picks, checked: it must be one of `workers`. A body the policy
    could not parse raises `RequestBodyError` (a 400, not the policy's fault)."""
    by_url = {w.url: w for w in workers}
    try:
        url = hook.route(request=request, workers=[w.load() for w in workers])
    except RequestBodyError:
        raise
    except Exception as e:
        raise RouteError(f"router policy {policy.name!r} failed: {type(e).__name__}: {e}") from e
    if url not in by_url:
        raise RouteError(
            f"router policy {policy.name!r} returned {url!r}, not one of the healthy workers "
            f"{sorted(by_url)}"
        )
    return by_url[url]


class Proxy:
    """Forwards requests to the workers of one pool, as its routing policy (registered with
    `plugins`, the pool's own plugin manager) picks them."""

    def __init__(
        self,
        client: UpstreamClient,
        pool: WorkerPool,
        plugins: PluginManager,
        policy: Router,
        metrics: RouterMetrics,
        role: str = "",
    ) -> None:
        self.client, self.pool, self.plugins, self.policy = client, pool, plugins, policy
        self.hook = plugins.hook
        self.metrics = metrics
        self.role = role  # "prefill"/"decode" in PD routing: named in errors

    def choose(self, request: RouteRequest, exclude: list[str] | tuple[str, ...] = ()) -> Worker:
        workers = self.pool.healthy(exclude=exclude)
        if not workers:
            self.metrics.unavailable.inc()
            kind = f"healthy {self.role} worker" if self.role else "healthy worker"
            raise NoWorkerError(
                f"no {kind}"
                + (f" (tried {', '.join(exclude)})" if exclude else "")
                + f"; workers: {', '.join(self.pool.workers)}"
            )
        worker = choose(self.policy, self.hook, request, workers)
        worker.routed += 1
        self.metrics.routed.labels(worker.url).inc()
        return worker

    async def forward(self, request: RouteRequest, raw: bytes, headers: dict[str, str]) -> Upstream:
        """Send the request to the worker the policy picks; on a worker that cannot take it,
        mark it and try the next one. Raises `NoWorkerError` when none is left."""
        tried: list[str] = []
        while True:
            worker = self.choose(request, tried)
            worker.in_flight += 1
            try:
                upstream = await self.send(worker, request.path, raw, headers)
            except UpstreamError as e:
                worker.in_flight -= 1
                worker.failures += 1
                self.pool.remove(worker, f"under a request: {e}")
            else:
                if upstream.response.status != 503:
                    if upstream.chunks is None:
                        worker.in_flight -= 1
                    return upstream
                worker.in_flight -= 1
                self.pool.remove(worker, "answered 503")
            self.metrics.retried.labels(worker.url).inc()
            tried.append(worker.url)
            request.retry_of = tuple(tried)

    async def send(
        self, worker: Worker, path: str, raw: bytes, headers: dict[str, str]
    ) -> Upstream:
        """One request to `worker`: a plain response read whole, a stream up to its first chunk
        (so a worker that dies before it raises `UpstreamError` and the request can move)."""
        response = await self.client.request(worker.url, "POST", path, raw, headers)
        if response.status != 200 or not response.streamed:
            return Upstream(worker, response, await response.read())
        chunks = response.chunks(framed=response.chunked)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await chunks.aclose()
            raise
        return Upstream(worker, response, first, chunks)

    def respond(self, upstream: Upstream) -> Response:
        r = upstream.response
        if upstream.chunks is None:
            return Response(r.status, upstream.body, r.media_type)
        return Response(
            r.status, media_type=r.media_type, chunks=self._relay(upstream), framed=r.chunked
        )

    async def _relay(self, upstream: Upstream) -> AsyncIterator[bytes]:
        """The stream's bytes, first chunk included; closes the worker's response and releases
        the worker's in-flight count however the stream ends (client gone included)."""
        worker = upstream.worker
        try:
            if upstream.body:
                yield upstream.body
            async for chunk in upstream.chunks:
                yield chunk
        except UpstreamError as e:
            worker.failures += 1
            self.pool.remove(worker, f"mid-stream: {e}")
            error = {
                "message": f"worker {worker.url} failed mid-stream: {e}",
                "type": "worker_error",
            }
            event = f"data: {json.dumps({'error': error})}\n\n".encode()
            yield frame(event) + LAST_CHUNK if upstream.response.chunked else event
        finally:
            worker.in_flight -= 1
            await upstream.chunks.aclose()


def route_error_response(e: Exception) -> Response:
    """The client's answer to a request that could not be routed."""
    if isinstance(e, RequestBodyError):
        return error_response(400, str(e))
    if isinstance(e, NoWorkerError):
        return error_response(503, str(e))
    return error_response(500, str(e), "internal_error")
