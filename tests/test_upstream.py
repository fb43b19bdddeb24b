"""FastUpstream against scripted raw servers: which failure is which error class, what is retried, what is
reused. The error class decides whether a start may move to another worker, so each is pinned down here."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from balancer.proxy import NotDelivered, Request, UpstreamFailed, UpstreamTimeout
from balancer.upstream import FastUpstream

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GET = Request("GET", "/pipelines", [("Accept", "application/json")])
POST = Request("POST", "/pipelines/a/b", [("Content-Type", "application/json")], b'{"source": {}}')
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3\r\n\r\n[]\n"


class Server:
    """A loopback server whose every connection runs ``script``; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(request)
        return request


@pytest.fixture
async def upstream() -> AsyncIterator[FastUpstream]:
    up = FastUpstream(connect_timeout=0.5, limit_per_worker=4, idle_timeout=15.0, start_reuse_idle=2.0)
    yield up
    await up.close()


def answering(*answers: bytes, then_close: bool = False) -> Callable[[Server], Script]:
    """A script: read a request, send the next answer, until they run out; then close or keep reading."""

    def make(server: Server) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                await server.read_request(reader)
                writer.write(answer)
                await writer.drain()
            if not then_close:
                await reader.read()

        return script

    return make


async def serve(make: Callable[[Server], Script]) -> Server:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.script = make(server)
    return server


async def test_keep_alive_reuses_one_connection(upstream: FastUpstream) -> None:
    async with await serve(answering(OK, OK, OK)) as server:
        for _ in range(3):
            resp = await upstream.send(server.url, GET, 5)
            assert (resp.status, resp.body) == (200, b"[]\n")
            assert ("Content-Type", "application/json") in resp.headers
            assert not any(n.lower() in ("content-length", "connection") for n, _ in resp.headers)
        assert server.connections == 1
        assert server.requests[0].startswith(b"GET /pipelines HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nAccept: application/json\r\n" in server.requests[0]


async def test_connection_refused_is_not_delivered(upstream: FastUpstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NotDelivered, match="cannot connect"):
        await upstream.send(f"http://127.0.0.1:{port}", POST, 5, fresh=True)


async def test_connect_timeout_is_not_delivered(upstream: FastUpstream) -> None:
    """A listener whose accept queue is full drops new SYNs: the connect times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the queue (Linux admits backlog + 1)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        with pytest.raises(NotDelivered, match="within"):
            await upstream.send(f"http://127.0.0.1:{port}", POST, 5, fresh=True)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(upstream: FastUpstream) -> None:
    async def slow(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(1.0)
        writer.write(OK)  # too late: must never be taken for the next request's answer
        await writer.drain()
        await reader.read()

    async with await serve(lambda s: lambda r, w: slow(s, r, w)) as server:
        with pytest.raises(UpstreamTimeout):
            await upstream.send(server.url, GET, 0.3)
        await asyncio.sleep(1.0)
        server.script = answering(OK)(server)
        assert (await upstream.send(server.url, GET, 5)).status == 200
        assert server.connections == 2


async def test_reused_connection_closed_without_answer_get_retried_once_post_never(upstream: FastUpstream) -> None:
    async def first_answers_then_drops(server: Server, reader: asyncio.StreamReader,
                                       writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)  # the next request is read, then the connection closes: no byte back

    async with await serve(lambda s: lambda r, w: first_answers_then_drops(s, r, w)) as server:
        assert (await upstream.send(server.url, GET, 5)).status == 200
        assert (await upstream.send(server.url, GET, 5)).status == 200  # dropped on the reused one, retried
        assert (len(server.requests), server.connections) == (3, 2)
        with pytest.raises(UpstreamFailed, match="before answering"):
            await upstream.send(server.url, POST, 5, fresh=True)  # reused, dropped: never sent again
        assert len(server.requests) == 4


async def test_a_fresh_connection_closed_without_answer_is_not_retried(upstream: FastUpstream) -> None:
    async def drop(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async with await serve(lambda s: lambda r, w: drop(s, r, w)) as server:
        with pytest.raises(UpstreamFailed):
            await upstream.send(server.url, GET, 5)
        assert len(server.requests) == 1


@pytest.mark.parametrize("answer,match", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1,", "middle of its answer"),
    (b"garbage\r\n\r\n", "invalid HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n[]\n", "invalid HTTP"),
])
async def test_broken_answers_are_failures(upstream: FastUpstream, answer: bytes, match: str) -> None:
    async with await serve(answering(answer, then_close=True)) as server:
        with pytest.raises(UpstreamFailed, match=match):
            await upstream.send(server.url, GET, 5)


async def test_answer_shapes(upstream: FastUpstream) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
               b"X-End: 2\r\n\r\n2\r\n[1\r\n2\r\n,2\r\n1\r\n]\r\n0\r\nX-Trailer: t\r\n\r\n")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    close_delimited = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    async with await serve(answering(chunked, interim, close_delimited, then_close=True)) as server:
        resp = await upstream.send(server.url, GET, 5)
        assert (resp.body, resp.headers) == (b"[1,2]", [("X-End", "2")])
        assert (await upstream.send(server.url, GET, 5)).body == b"[]\n"
        resp = await upstream.send(server.url, GET, 5)
        assert (resp.status, resp.body) == (200, b"all of it")


async def test_head_answer_ends_at_its_headers(upstream: FastUpstream) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
    async with await serve(answering(head)) as server:
        resp = await upstream.send(server.url, Request("HEAD", "/pipelines", []), 5)
        assert (resp.status, resp.body) == (200, b"")


async def test_connections_per_worker_are_bounded(upstream: FastUpstream) -> None:
    in_flight = 0
    most = 0

    async def slow_ok(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most
        while True:
            await server.read_request(reader)
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            writer.write(OK)
            await writer.drain()

    async with await serve(lambda s: lambda r, w: slow_ok(s, r, w)) as server:
        answers = await asyncio.gather(*(upstream.send(server.url, GET, 5) for _ in range(12)))
        assert [a.status for a in answers] == [200] * 12
        assert most == 4 and server.connections == 4


async def test_waiting_for_a_busy_worker_ends_as_a_timeout_not_as_undelivered() -> None:
    async def hang(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()

    up = FastUpstream(connect_timeout=0.5, limit_per_worker=1)
    try:
        async with await serve(lambda s: lambda r, w: hang(s, r, w)) as server:
            first = asyncio.ensure_future(up.send(server.url, GET, 0.6))
            await asyncio.sleep(0.1)
            with pytest.raises(UpstreamTimeout, match="busy"):
                await up.send(server.url, POST, 0.2, fresh=True)
            with pytest.raises(UpstreamTimeout):
                await first
            assert server.connections == 1 and len(server.requests) == 1
    finally:
        await up.close()


async def test_idle_connections_are_reaped_and_starts_skip_stale_ones() -> None:
    up = FastUpstream(connect_timeout=0.5, idle_timeout=0.3, start_reuse_idle=0.1)
    try:
        async with await serve(answering(OK, OK, OK)) as server:
            assert (await up.send(server.url, GET, 5)).status == 200
            await asyncio.sleep(0.2)
            assert (await up.send(server.url, POST, 5, fresh=True)).status == 200  # idle 0.2 s > 0.1 s
            assert server.connections == 2
            await asyncio.sleep(1.5)  # past idle_timeout: both are closed by the ticker
            assert up.stats().get(server.url, {"open": 0})["open"] == 0
    finally:
        await up.close()
