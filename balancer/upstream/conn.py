"""One keep-alive connection to a worker (asyncio Protocol + httptools): one exchange at a time.

It tells apart the ways an exchange can end, which the client turns into error
classes: an answer, a close before any byte of it (:class:`ClosedEmpty`), a
close or garbage in the middle of it, or the deadline (enforced by the client's
ticker through :meth:`Conn.timed_out`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, cast

import httptools

from balancer.proxy import HOP_BY_HOP, Request, Response, UpstreamFailed, UpstreamTimeout

if TYPE_CHECKING:
    from balancer.upstream.pool import HostPool

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_NOT_PASSED_ON = frozenset(h.encode() for h in HOP_BY_HOP | {"content-length"})
"""Framing and hop-by-hop headers of a worker's answer: the front frames the answer itself."""


class ClosedEmpty(UpstreamFailed):
    """The worker closed the connection without sending a single byte of the answer."""


def encode_request(request: Request, host: str, prefix: str) -> bytes:
    """The request as bytes on the wire: Host and Content-Length are ours, the rest is the caller's."""
    lines = "".join([f"{n}: {v}\r\n" for n, v in request.headers])
    body = request.body
    length = f"Content-Length: {len(body)}\r\n" if body or request.method in BODY_METHODS else ""
    head = f"{request.method} {prefix}{request.path_qs} HTTP/1.1\r\nHost: {host}\r\n{lines}{length}\r\n"
    return head.encode("latin-1") + body if body else head.encode("latin-1")


class Conn(asyncio.Protocol):
    """One connection to a worker; one exchange at a time."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.open = False
        """Connected, and the worker has not closed its side."""
        self.reusable = False
        self.idle_since = 0.0
        self.received = 0
        self.deadline = 0.0
        self.waiter: asyncio.Future[Response] | None = None
        self._head_only = False
        self._interim = False
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._named: set[str] | None = None
        """Headers the worker's ``Connection`` header names: hop-by-hop too."""
        self._framed = False
        self._body: list[bytes] = []
        self._headers_done = False

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.open = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for (e.g. a 408 on an idle connection): unusable
            self.abort()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailed(f"invalid HTTP from worker: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        self.open = False
        self._ended("closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._ended(f"connection lost: {exc}" if exc else "closed the connection")
        self.pool.forget(self)

    # ---- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._named = None
        self._framed = False
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # trailers of a chunked answer are dropped
        lowered = name.lower()
        if lowered in _NOT_PASSED_ON:
            if lowered == b"connection":
                tokens = {t.strip().lower() for t in value.decode("latin-1").split(",")}
                self._named = tokens if self._named is None else self._named | tokens
            elif lowered == b"content-length" or lowered == b"transfer-encoding":
                self._framed = True
            return
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self._headers_done = True
        if status < 200:
            if status == 101:
                self._fail(UpstreamFailed("worker switched protocols"))
                self.abort()
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self._status = status
        if self._head_only:  # llhttp cannot be told a HEAD answer has no body: stop here, drop the connection
            self._finish(False)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.waiter is not None:
            self._finish(self.parser.should_keep_alive())

    # ---- exchanges ------------------------------------------------------------------------
    def exchange(self, data: bytes, deadline: float, head_only: bool) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.waiter = waiter = self.loop.create_future()
        self.received = 0
        self.reusable = False
        self.deadline = deadline
        self._head_only = head_only
        self._interim = False
        self._headers_done = False
        self.pool.upstream.busy.add(self)
        self.transport.write(data)
        return waiter

    def _finish(self, keep_alive: bool) -> None:
        waiter, self.waiter = self.waiter, None
        self.pool.upstream.busy.discard(self)
        self.reusable = keep_alive and self.open
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            headers = self._headers
            if self._named:
                named = self._named
                headers = [(n, v) for n, v in headers if n.lower() not in named]
            waiter.set_result(Response(self._status, headers, body))
        self._headers, self._body = [], []

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        self.pool.upstream.busy.discard(self)
        self.reusable = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def timed_out(self) -> None:
        self._fail(UpstreamTimeout("no answer in time"))
        self.abort()

    def _ended(self, why: str) -> None:
        if self.waiter is None:
            return
        if self._headers_done and not self._interim and not self._framed:
            self._finish(False)  # an answer delimited by the close (HTTP/1.0 style)
        elif self.received == 0:
            self._fail(ClosedEmpty(f"worker {why} before answering"))
        else:
            self._fail(UpstreamFailed(f"worker {why} in the middle of its answer"))

    def abort(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.abort()
