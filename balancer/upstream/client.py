"""The fast :class:`~balancer.proxy.Upstream`: pooled keep-alive connections on asyncio Protocols + httptools.

Why not aiohttp's client: its per-request cost (timeouts, tracing, cookie jar,
multidicts) dominated the forwarding path. One :class:`Conn` carries one
request at a time; each worker gets a bounded LIFO pool of idle connections.

Error classes are exact (DESIGN §2):

- :class:`NotDelivered` only when the request provably never left the
  balancer: the connect was refused or timed out. A pooled connection that is
  already seen closed when it is taken is just dropped, not an error.
- Once bytes were written, a failure is :class:`UpstreamFailed` (502) or
  :class:`UpstreamTimeout` (504). The one retry: an idempotent request
  (GET/HEAD/DELETE/OPTIONS) on a *reused* connection that the worker closed without a
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
import ssl

from balancer.proxy import NotDelivered, Request, Response, UpstreamFailed
from balancer.upstream.conn import ClosedEmpty, Conn, encode_request
from balancer.upstream.pool import HostPool

IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
TICK = 0.05
"""Seconds between two checks of the exchanges' deadlines: one timer for all, none per request."""
REAP_EVERY = 20
"""Ticks between two sweeps for idle connections past ``idle_timeout``."""


class FastUpstream:
    """Per-worker pools of keep-alive connections; see the module docstring for the error rules."""

    def __init__(
        self,
        connect_timeout: float,
        limit_per_worker: int = 128,
        idle_timeout: float = 15.0,
        start_reuse_idle: float = 2.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.limit = limit_per_worker
        self.idle_timeout = idle_timeout
        self.start_reuse_idle = start_reuse_idle
        self.closed = False
        self.ssl_context: ssl.SSLContext | None = None
        self._pools: dict[str, HostPool] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.busy: set[Conn] = set()
        """Connections waiting for an answer: the ticker enforces their deadlines."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick(), name="upstream-ticker")
        return self._loop

    def _pool(self, base_url: str) -> HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            if self.closed:
                raise NotDelivered("balancer is shutting down")
            pool = self._pools[base_url] = HostPool(self, base_url)
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
            except ClosedEmpty as exc:
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
        """Open and idle connections per worker URL (tests, debugging)."""
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
