"""The fast :class:`~balancer.proxy.Upstream`: pooled keep-alive connections on asyncio Protocols + httptools.

Why not aiohttp's client: its per-request cost (timeouts, tracing, cookie jar,
multidicts) dominated the forwarding path. One :class:`_Conn` carries one
request at a time; each worker gets a bounded LIFO pool of idle connections.

Error classes are exact (DESIGN §2):

- :class:`NotDelivered` only when the request provably never left the
  balancer: the connect was refused or timed out. A pooled connection that is
  already seen closed when it is taken is just dropped, not an error.
- Once bytes were written, a failure is :class:`UpstreamFailed` (502) or
  :class:`UpstreamTimeout` (504). The one retry: an idempotent request
  (GET/HEAD/DELETE) on a *reused* connection that the worker closed without a
  single response byte (it closed the idle connection as we wrote) is sent
  once more on a new connection. A POST is never replayed.

Starts (``fresh=True``) reuse a pooled connection only if it answered within
the last ``start_reuse_idle`` seconds: such a connection is not about to be
closed by the worker's keep-alive timeout (seconds to minutes on every server
we front), so the start does not race an idle close, and it skips a TCP
handshake (HAProxy reuses connections the same way). ``start_reuse_idle=0``
gives every start a new connection. Either way a start that fails after it was
written is a 502/504, never "not delivered".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from balancer.proxy import HOP_BY_HOP, NotDelivered, Request, Response, UpstreamFailed, UpstreamTimeout

log = logging.getLogger("balancer.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_NOT_PASSED_ON = frozenset(h.encode() for h in HOP_BY_HOP | {"content-length"})
"""Framing and hop-by-hop headers of a worker's answer: the front frames the answer itself."""
TICK = 0.05
"""Seconds between two checks of the exchanges' deadlines: one timer for all, none per request."""
REAP_EVERY = 20
"""Ticks between two sweeps for idle connections past ``idle_timeout``."""


class _ClosedEmpty(UpstreamFailed):
    """The worker closed the connection without sending a single byte of the answer."""


def encode_request(request: Request, host: str, prefix: str) -> bytes:
    """The request as bytes on the wire: Host and Content-Length are ours, the rest is the caller's."""
    lines = "".join([f"{n}: {v}\r\n" for n, v in request.headers])
    body = request.body
    length = f"Content-Length: {len(body)}\r\n" if body or request.method in BODY_METHODS else ""
    head = f"{request.method} {prefix}{request.path_qs} HTTP/1.1\r\nHost: {host}\r\n{lines}{length}\r\n"
    return head.encode("latin-1") + body if body else head.encode("latin-1")


class _Conn(asyncio.Protocol):
    """One connection to a worker; one exchange at a time."""

    def __init__(self, pool: _HostPool) -> None:
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
            self._fail(_ClosedEmpty(f"worker {why} before answering"))
        else:
            self._fail(UpstreamFailed(f"worker {why} in the middle of its answer"))

    def abort(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.abort()


class _HostPool:
    """Connections to one worker: idle ones on a stack (the warmest first), at most ``limit`` in all."""

    def __init__(self, upstream: FastUpstream, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) worker URL: {base_url!r}")
        self.upstream = upstream
        self.loop = upstream.loop
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.host_header = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/")
        self.idle: list[_Conn] = []
        self.members: set[_Conn] = set()
        """Open connections, busy or idle."""
        self.connecting = 0
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()

    @property
    def total(self) -> int:
        return self.connecting + len(self.members)

    def take(self, max_idle: float, now: float) -> _Conn | None:
        """The most recently used idle connection, if it is alive and was used within ``max_idle``."""
        idle = self.idle
        while idle:
            conn = idle[-1]
            if not conn.open:
                idle.pop()
                continue
            if now - conn.idle_since > max_idle:
                return None  # the rest are older still
            idle.pop()
            return conn
        return None

    async def connect(self, deadline: float) -> _Conn:
        """A new connection, waiting for a free slot if the worker has ``limit`` already."""
        while self.total >= self.upstream.limit:
            handed = await self._wait_for_slot(deadline)
            if handed is not None:
                return handed
        self.connecting += 1
        timeout = min(self.upstream.connect_timeout, max(0.0, deadline - self.loop.time()))
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self), self.host, self.port, ssl=self.upstream.ssl_context if self.tls else None
                )
        except TimeoutError:
            raise NotDelivered(f"cannot connect within {timeout:g}s") from None
        except OSError as exc:
            raise NotDelivered(f"cannot connect: {exc}") from None
        finally:
            self.connecting -= 1
            if conn is None or not conn.open:
                self._slot_freed()
        if not conn.open:  # accepted and closed at once: nothing was written
            raise NotDelivered("worker closed the connection as it was opened")
        self.members.add(conn)
        return conn

    async def _wait_for_slot(self, deadline: float) -> _Conn | None:
        waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
        self.waiters.append(waiter)

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(UpstreamTimeout(f"all {self.upstream.limit} connections to the worker busy"))

        timer = self.loop.call_at(deadline, expire)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                conn = waiter.result()
                if conn is not None:
                    self.release(conn)
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def release(self, conn: _Conn) -> None:
        """An exchange ended: keep the connection for the next request if it can carry one."""
        if not (conn.reusable and conn.open) or self.upstream.closed:
            conn.abort()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        """A connection closed: free its slot."""
        if conn not in self.members:
            return
        self.members.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        """Someone waiting for a connection may open one now."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def reap(self, older_than: float) -> None:
        for conn in [c for c in self.idle if c.idle_since < older_than or not c.open]:
            self.idle.remove(conn)
            conn.abort()

    def close(self) -> None:
        for conn in list(self.members):
            conn.abort()
        self.idle.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(NotDelivered("balancer is shutting down"))


class FastUpstream:
    """Per-worker pools of keep-alive connections; see the module docstring for the error rules."""

    def __init__(
        self,
        connect_timeout: float,
        limit_per_worker: int = 128,
        idle_timeout: float = 15.0,
        start_reuse_idle: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.limit = limit_per_worker
        self.idle_timeout = idle_timeout
        self.start_reuse_idle = start_reuse_idle
        self.closed = False
        self.ssl_context: ssl.SSLContext | None = None
        self._pools: dict[str, _HostPool] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.busy: set[_Conn] = set()
        """Connections waiting for an answer: the ticker enforces their deadlines."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick(), name="upstream-ticker")
        return self._loop

    def _pool(self, base_url: str) -> _HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            if self.closed:
                raise NotDelivered("balancer is shutting down")
            pool = self._pools[base_url] = _HostPool(self, base_url)
            if pool.tls and self.ssl_context is None:
                self.ssl_context = ssl.create_default_context()
        return pool

    async def send(self, base_url: str, request: Request, timeout: float, fresh: bool = False) -> Response:
        loop = self.loop
        pool = self._pool(base_url)
        now = loop.time()
        deadline = now + timeout
        data = encode_request(request, pool.host_header, pool.prefix)
        head_only = request.method == "HEAD"
        conn = pool.take(self.start_reuse_idle if fresh else self.idle_timeout, now)
        reused = conn is not None
        if conn is None:
            conn = await pool.connect(deadline)
        for attempt in (1, 2):
            try:
                return await conn.exchange(data, deadline, head_only)
            except _ClosedEmpty as exc:
                # the worker closed a reused connection as we wrote: an idempotent request gets one new one
                if attempt == 2 or not (reused and request.method in IDEMPOTENT):
                    raise UpstreamFailed(str(exc)) from None
            except asyncio.CancelledError:
                conn.abort()
                raise
            finally:
                pool.release(conn)
            conn = await pool.connect(deadline)
        raise AssertionError("unreachable")

    async def _tick(self) -> None:
        """Fail exchanges past their deadline; now and then, close idle connections past ``idle_timeout``."""
        ticks = 0
        while True:
            await asyncio.sleep(TICK)
            now = self.loop.time()
            for conn in [c for c in self.busy if c.deadline <= now]:
                conn.timed_out()
            ticks += 1
            if ticks % REAP_EVERY:
                continue
            older_than = now - self.idle_timeout
            for url, pool in list(self._pools.items()):
                pool.reap(older_than)
                if pool.total <= 0 and not pool.waiters:
                    del self._pools[url]  # workers come and go (pod IPs): forget empty pools

    def stats(self) -> dict[str, dict[str, int]]:
        """Open and idle connections per worker URL, for ``/backends`` and tests."""
        return {url: {"open": p.total, "idle": len(p.idle)} for url, p in self._pools.items()}

    async def close(self) -> None:
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
