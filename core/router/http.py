"""The router's HTTP/1.1 server, on plain asyncio streams.

The router's request path is a handful of awaits: read a request, pick a worker, pass the
worker's bytes on. A general web stack (uvicorn's h11 parser, Starlette, a streaming response
object) cost several times the routing itself here (docs/benchmarks.md, "Router overhead"), so
the router speaks the small part of HTTP/1.1 it needs directly: keep-alive, `Content-Length` and
chunked request bodies, `Expect: 100-continue`, plain responses with a `Content-Length` and
streamed ones with chunked transfer encoding. Anything else gets a 4xx and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("pegboard.router")

#: Bytes of request line and headers accepted; a longer head is answered 431.
MAX_HEAD = 64 * 1024
#: Bytes of request body accepted; a larger one is answered 413.
MAX_BODY = 256 * 1024 * 1024
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 75.0

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip


class BadRequest(Exception):
    """A request this server cannot read; answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One HTTP request: header names lower-cased (the last of repeated ones wins)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    query: str = ""


@dataclass
class Response:
    """A whole response (sent with a `Content-Length`), or a stream when `chunks` is set (sent
    chunked as the chunks come; the iterator is closed however the stream ends). `framed`: the
    chunks are chunk frames already, the last one included (a worker's, passed through)."""

    status: int = 200
    body: bytes = b""
    media_type: str | None = "application/json"
    chunks: AsyncIterator[bytes] | None = None
    framed: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(data, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode())


def error_response(status: int, message: str, kind: str | None = None) -> Response:
    """OpenAI's error shape (the same as `pegboard serve`'s)."""
    kind = kind or ("service_unavailable" if status == 503 else "invalid_request_error")
    return json_response({"error": {"message": message, "type": kind, "code": status}}, status)


Handler = Callable[[Request], Awaitable[Response]]


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """The next request on a connection, None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise BadRequest(400, "the request ended inside its headers") from e
        return None
    except asyncio.LimitOverrunError as e:
        raise BadRequest(431, f"request headers over {MAX_HEAD} bytes") from e
    lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400, f"malformed request line {lines[0][:100]!r}") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(400, f"unsupported protocol {version[:20]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    path, _, query = target.partition("?")
    request = Request(method, path, headers, query=query)
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        request.body = await _read_chunked(reader)
    elif (length := headers.get("content-length")) is not None:
        if not length.isdigit():
            raise BadRequest(400, f"bad Content-Length {length[:20]!r}")
        if int(length) > MAX_BODY:
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        request.body = await reader.readexactly(int(length))
    return request


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts, size = [], 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            n = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise BadRequest(400, "malformed chunk size in the request body") from None
        size += n
        if size > MAX_BODY:
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        if n == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(n))
        await reader.readexactly(2)


LAST_CHUNK = b"0\r\n\r\n"


def frame(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _head(status: int, media_type: str | None, extra: list[tuple[str, str]], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    if media_type:
        lines.append(f"content-type: {media_type}")
    lines += [f"{k}: {v}" for k, v in extra]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


async def write_response(writer: asyncio.StreamWriter, response: Response, close: bool) -> None:
    """Send `response`; a stream goes out chunk by chunk as its iterator yields (the iterator is
    closed however the stream ends, a client gone included)."""
    head = _head(response.status, response.media_type, response.headers, close)
    if response.chunks is None:
        writer.write(head + b"content-length: %d\r\n\r\n" % len(response.body) + response.body)
        await writer.drain()
        return
    pending = head + b"transfer-encoding: chunked\r\n\r\n"  # goes with the first chunk
    chunks = response.chunks
    send = asyncio.ensure_future(_send_chunks(writer, chunks, response.framed, pending))
    gone = asyncio.ensure_future(_closed(writer))
    try:
        # A client that leaves stops the stream at once, not at the next chunk's write (which
        # may be long in coming: a prefill, a queue): closing the chunks closes the worker's
        # response, so the worker aborts the request.
        await asyncio.wait((send, gone), return_when=asyncio.FIRST_COMPLETED)
        if not send.done():
            raise ConnectionResetError("the client went away mid-stream")
        send.result()
    finally:
        gone.cancel()
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)  # off the chunks before closing them
        await chunks.aclose()


async def _send_chunks(
    writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes], framed: bool, pending: bytes
) -> None:
    async for chunk in chunks:
        if chunk:
            writer.write(pending + (chunk if framed else frame(chunk)))
            pending = b""
            await writer.drain()
    if not framed:
        writer.write(pending + LAST_CHUNK)
        await writer.drain()


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Returns when the connection is gone (`_ClientProtocol`: the client closed its end)."""
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class _ClientProtocol(asyncio.StreamReaderProtocol):
    """A client connection that closes when the client closes its end (EOF), as uvicorn's do:
    an HTTP client that is done sending is gone, and `write_response` sees it at once."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class HTTPServer:
    """Serves `handler` on `host:port` until `close()`: one task per connection, requests on a
    connection answered in order."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._busy: set[asyncio.Task] = set()  # connections inside a request
        self._idle: set[asyncio.Task] = set()  # connections waiting for their next request

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> _ClientProtocol:  # `asyncio.start_server`'s, closing on EOF
            reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
            return _ClientProtocol(reader, self._connection, loop=loop)

        self._server = await loop.create_server(protocol, host, port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let requests in progress finish (up to `drain_s`), close the rest."""
        if self._server is not None:
            self._server.close()
        for task in self._idle:
            task.cancel()
        if self._busy:
            await asyncio.wait(self._busy, timeout=drain_s)
        for task in self._busy | self._idle:
            task.cancel()
        await asyncio.gather(*self._busy, *self._idle, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY: small SSE chunks go at once
        try:
            while True:
                self._idle.add(task)
                try:
                    async with asyncio.timeout(KEEP_ALIVE_S):
                        request = await read_request(reader, writer)
                except BadRequest as e:
                    await write_response(writer, error_response(e.status, str(e)), close=True)
                    await _discard(reader, writer)
                    return
                finally:
                    self._idle.discard(task)
                if request is None:
                    return
                self._busy.add(task)
                try:
                    close = request.headers.get("connection", "").lower() == "close"
                    await write_response(writer, await self._answer(request), close)
                finally:
                    self._busy.discard(task)
                if close or self._server is None or not self._server.is_serving():
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away, or stayed idle too long
        finally:
            writer.close()

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, f"router error: {type(e).__name__}: {e}", "internal_error")


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read and drop what the client still sends (bounded) before closing: closing a socket
    with unread bytes resets it, and the reset can destroy the error response on its way."""
    writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(2.0):
            for _ in range(64):
                if not await reader.read(1 << 16):
                    return


def run_http(
    handler: Handler,
    host: str,
    port: int,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    watch: Callable[[Callable[[int], None]], Awaitable[None]] | None = None,
) -> int:
    """Serve until SIGTERM / SIGINT (exit 0; a second signal exits at once), or until `watch`
    calls its argument with an exit status. `startup` runs before the port opens, `shutdown`
    after the requests in progress finished."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def stop(status: int) -> None:
            if not done.done():
                done.set_result(status)

        def on_signal() -> None:
            if done.done():
                raise SystemExit(1)
            stop(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        server = HTTPServer(handler)
        await startup()
        try:
            await server.start(host, port)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
            await shutdown()
            return 1
        log.info("router listening on http://%s:%d", host, server.port)
        watcher = asyncio.create_task(watch(stop)) if watch is not None else None
        try:
            status = await done
        finally:
            if watcher is not None:
                watcher.cancel()
            await server.close()
            await shutdown()
        return status

    return asyncio.run(main())
