"""The connections to one worker: idle ones on a stack, a bound on how many, waiting for a free one."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from balancer.proxy import NotDelivered, UpstreamTimeout
from balancer.upstream.conn import Conn

if TYPE_CHECKING:
    from balancer.upstream.client import FastUpstream


class HostPool:
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
        self.idle: list[Conn] = []
        self.members: set[Conn] = set()
        """Open connections, busy or idle."""
        self.connecting = 0
        self.waiters: deque[asyncio.Future[Conn | None]] = deque()

    @property
    def total(self) -> int:
        return self.connecting + len(self.members)

    def take(self, max_idle: float, now: float) -> Conn | None:
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

    async def connect(self, deadline: float) -> Conn:
        """A new connection, waiting for a free slot if the worker has ``limit`` already."""
        while self.total >= self.upstream.limit:
            handed = await self._wait_for_slot(deadline)
            if handed is not None:
                return handed
        self.connecting += 1
        timeout = min(self.upstream.connect_timeout, max(0.0, deadline - self.loop.time()))
        conn: Conn | None = None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Conn(self), self.host, self.port, ssl=self.upstream.ssl_context if self.tls else None
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

    async def _wait_for_slot(self, deadline: float) -> Conn | None:
        waiter: asyncio.Future[Conn | None] = self.loop.create_future()
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

    def release(self, conn: Conn) -> None:
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

    def forget(self, conn: Conn) -> None:
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
