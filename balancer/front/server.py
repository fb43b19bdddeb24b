"""The fast front's listener: sockets, the connection table and its limit, timeouts, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Coroutine
from typing import Any

from balancer.admin import Admin
from balancer.dispatch import ClientRequest, Dispatcher
from balancer.front.connection import Connection, Limits
from balancer.front.wire import error_answer
from balancer.proxy import Response

log = logging.getLogger("balancer.front")

SWEEP_EVERY = 0.25
"""Seconds between two checks of every connection's timeouts: one timer for all, none per request."""
SPARE_FDS = 256
"""File descriptors kept for upstream connections, logs and the like, beyond client connections."""


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft open-files limit towards ``wanted`` (up to the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


class FastFront:
    """Serves the API (or only the admin routes) on one address with :class:`Connection` protocols."""

    def __init__(
        self,
        admin: Admin,
        dispatcher: Dispatcher | None,
        limits: Limits,
        max_connections: int,
    ) -> None:
        self.admin = admin
        self.dispatcher = dispatcher
        self.limits = limits
        self.max_connections = max_connections
        self.stopping = False
        self.connections: set[Connection] = set()
        """Connections being served (counted against ``max_connections``)."""
        self.refusing: set[Connection] = set()
        """Connections over the limit: told 503, closed after a short linger (the sweeper bounds it)."""
        self.refused = 0
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None
        self.loop = asyncio.get_running_loop()

    async def start(self, host: str, port: int) -> None:
        room = raise_fd_limit(self.max_connections + SPARE_FDS)
        if room < self.max_connections + SPARE_FDS:
            log.warning("open-files limit %d is below max_connections %d + %d spare: connections beyond it "
                        "will fail to be accepted", room, self.max_connections, SPARE_FDS)
        server = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=1024, reuse_address=True
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep(), name="front-sweeper")

    # ---- the Listener interface of Connection ---------------------------------------------
    def opened(self, conn: Connection) -> bool:
        if len(self.connections) >= self.max_connections or self.stopping:
            self.refused += 1
            self.refusing.add(conn)
            return False
        self.connections.add(conn)
        return True

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.refusing.discard(conn)
        if not self.connections and self._idle is not None:
            self._idle.set()

    def respond(self, request: ClientRequest) -> Response | Coroutine[Any, Any, Response]:
        """Admin routes (GET/HEAD on their paths) answer at once; anything else is the dispatcher's coroutine."""
        if request.method == "GET" or request.method == "HEAD":
            path = request.path_qs.partition("?")[0]
            if self.admin.serves(path):
                return self.admin.answer(path, _header(request, "authorization"))
        if self.dispatcher is None:
            return error_answer(404, "not found")
        return self.dispatcher.handle(request)

    # ---- timeouts ----------------------------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = self.loop.time()
            for conn in [*self.connections, *self.refusing]:
                conn.sweep(now)

    # ---- shutdown ------------------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Stop listening, close idle connections, give the others ``grace`` seconds to finish."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for conn in [*self.connections, *self.refusing]:
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


def _header(request: ClientRequest, lowered: str) -> str | None:
    for name, value in request.headers:
        if name.lower() == lowered:
            return value
    return None
