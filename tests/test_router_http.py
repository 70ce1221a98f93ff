"""The router's own HTTP/1.1 layer (`core/router/http.py`, `core/router/upstream.py`) against
real sockets on loopback: what clients send it, what workers answer it, connection reuse, and
streams passed through frame by frame."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from pegboard.core.router.http import HTTPServer, Request, Response, frame, json_response
from pegboard.core.router.upstream import UpstreamClient, UpstreamError, _dechunk


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def echo(request: Request) -> Response:
    if request.path == "/stream":

        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return Response(200, media_type="text/event-stream", chunks=chunks())
    return json_response({"method": request.method, "path": request.path, "len": len(request.body)})


async def serving(handler=echo) -> HTTPServer:
    server = HTTPServer(handler)
    await server.start("127.0.0.1", 0)
    return server


async def raw_exchange(port: int, data: bytes, until: bytes = b"}") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    while not out.endswith(until):
        more = await reader.read(65536)
        if not more:
            break
        out += more
    writer.close()
    return out


def test_a_client_reuses_its_connection_and_streams_arrive_chunked():
    async def main():
        server = await serving()
        try:
            url = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient() as client:
                r1 = await client.post(url + "/a", content=b"x" * 10)
                r2 = await client.post(url + "/b", content=b"")
                async with client.stream("POST", url + "/stream") as s:
                    body = b"".join([c async for c in s.aiter_raw()])
                assert s.headers["transfer-encoding"] == "chunked"
            return r1.json(), r2.json(), body
        finally:
            await server.close()

    first, second, streamed = run(main())
    assert first == {"method": "POST", "path": "/a", "len": 10}
    assert second["path"] == "/b" and second["len"] == 0
    assert streamed == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_chunked_request_bodies_and_expect_100_continue_are_read():
    async def main():
        server = await serving()
        try:
            chunked = await raw_exchange(
                server.port,
                b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
            )
            expect = await raw_exchange(
                server.port,
                b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
                b"wxyz",
            )
            return chunked, expect
        finally:
            await server.close()

    chunked, expect = run(main())
    assert json.loads(chunked.split(b"\r\n\r\n", 1)[1])["len"] == 5
    assert expect.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert json.loads(expect.rsplit(b"\r\n\r\n", 1)[1])["len"] == 4


@pytest.mark.parametrize(
    "data, status",
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET / SPDY/3\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", b"431"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(data, status):
    async def main():
        server = await serving()
        try:
            bad = await raw_exchange(server.port, data)
            good = await raw_exchange(server.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            return bad, good
        finally:
            await server.close()

    bad, good = run(main())
    assert bad.split(b" ")[1] == status and b'"error"' in bad
    assert b"200 OK" in good


def test_a_handler_that_raises_answers_500_naming_the_error():
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    async def main():
        server = await serving(broken)
        try:
            async with httpx.AsyncClient() as client:
                return await client.get(f"http://127.0.0.1:{server.port}/")
        finally:
            await server.close()

    r = run(main())
    assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]


def test_the_upstream_client_keeps_connections_and_passes_chunk_frames_through():
    async def main():
        server = await serving()
        client = UpstreamClient(timeout=30)
        base = f"http://127.0.0.1:{server.port}"
        try:
            r = await client.request(base, "POST", "/x", b"hello")
            body = json.loads(await r.read())
            conn = client._idle[("127.0.0.1", server.port)][-1]
            r = await client.request(base, "POST", "/stream")
            frames = b"".join([c async for c in r.chunks(framed=True)])
            reused = client._idle[("127.0.0.1", server.port)][-1] is conn
            return body, r.streamed, frames, reused
        finally:
            await client.aclose()
            await server.close()

    body, streamed, frames, reused = run(main())
    assert body == {"method": "POST", "path": "/x", "len": 5}
    assert streamed and reused
    assert frames == b"".join(frame(f"data: {i}\n\n".encode()) for i in range(3)) + b"0\r\n\r\n"


def test_a_connection_the_worker_closed_while_idle_is_replaced_invisibly():
    async def main():
        server = await serving()
        client = UpstreamClient(timeout=30)
        base = f"http://127.0.0.1:{server.port}"
        try:
            await (await client.request(base, "GET", "/1")).read()
            for task in list(server._idle):  # the worker drops its idle keep-alive connection
                task.cancel()
            await asyncio.sleep(0.05)
            return json.loads(await (await client.request(base, "GET", "/2")).read())
        finally:
            await client.aclose()
            await server.close()

    assert run(main())["path"] == "/2"


def test_an_unreachable_worker_is_an_upstream_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there

    async def main():
        client = UpstreamClient(timeout=5, connect_timeout=5)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.request(f"http://127.0.0.1:{port}", "GET", "/")

    run(main())


def test_dechunk_returns_complete_chunks_only_and_sees_the_last_one():
    buffer = bytearray(b"5\r\nhello\r\n3\r\nab")
    assert _dechunk(buffer) == (b"hello", False) and buffer == b"3\r\nab"
    buffer += b"c\r\n0\r\nTrailer: x\r\n\r\n"
    assert _dechunk(buffer) == (b"abc", True) and buffer == b""
    framed = bytearray(b"2\r\nhi\r\n0\r\n\r\n")
    assert _dechunk(framed, framed=True) == (b"2\r\nhi\r\n0\r\n\r\n", True)


class SilentStreamWorker:
    """A worker on loopback (plain asyncio streams) that answers `GET /health` and, to a POST,
    the head and first event of a stream it never continues; `aborted` is set when the router
    closes that request's connection (a real worker aborts the request then)."""

    def __init__(self) -> None:
        self.streaming, self.aborted = asyncio.Event(), asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                method, path = head.split()[:2]
                if method == "get":
                    status = "200 OK" if path == "/health" else "404 Not Found"
                    writer.write(f"HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\n{{}}".encode())
                    continue
                length = int(head.split("content-length:")[1].split()[0])
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + frame(b"data: {}\n\n")
                )
                self.streaming.set()
                await reader.read()  # nothing more comes until the router closes the request
                self.aborted.set()
                return
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


def test_a_client_leaving_mid_stream_aborts_the_workers_request_without_another_chunk():
    """The worker sends nothing after its first event (a long prefill, a queue): the router
    must notice the client's disconnect itself, not at the next chunk, and close the worker's
    request, releasing the worker's in-flight count."""
    from pegboard.core.router.app import RouterSettings, create_router_app

    async def main():
        worker = SilentStreamWorker()
        url = await worker.start()
        app = create_router_app(RouterSettings(workers=[url]))
        await app.proxies[0].pool.check_all()  # healthy, without the background checks
        router = HTTPServer(app.handle)
        await router.start("127.0.0.1", 0)
        try:
            body = {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True}
            async with httpx.AsyncClient() as client:
                async with client.stream(
                    "POST", f"http://127.0.0.1:{router.port}/v1/completions", json=body
                ) as r:
                    first = await anext(r.aiter_raw())
            # the client has closed its connection, mid-stream
            await worker.aborted.wait()
            return first, app.proxies[0].pool.workers[url].in_flight
        finally:
            await router.close(drain_s=0)
            await app.shutdown()
            worker.server.close()

    first, in_flight = run(main())
    assert first == b"data: {}\n\n" and in_flight == 0
