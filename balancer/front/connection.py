"""One client connection of the fast front: keep-alive, pipelining, timeouts, clean closes.

Requests are answered in order, one at a time per connection; pipelined ones
wait in a short queue (reading pauses when it is full). Anything malformed or
over a limit gets a short JSON error, then the connection is closed: after an
error the framing of what follows cannot be trusted (request smuggling).
Closing is "lingering": our side is shut down after the answer and the client's
remaining bytes are read and dropped for a moment, so the client sees the
answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from balancer.dispatch import ClientRequest
from balancer.front.reader import Limits, Pending, RequestReader
from balancer.front.wire import CONTINUE, HttpError, encode_response, error_answer
from balancer.proxy import Response

__all__ = ["Connection", "Limits", "Listener"]

log = logging.getLogger("balancer.front")

MAX_PIPELINED = 16
"""Requests read ahead of their answers before reading pauses."""
LINGER = 2.0
"""Seconds a closing connection keeps draining the client's bytes after our last answer."""


class Listener(Protocol):
    """What a connection needs from the listener that owns it."""

    loop: asyncio.AbstractEventLoop
    limits: Limits
    stopping: bool

    def respond(self, request: ClientRequest) -> Response | Coroutine[Any, Any, Response]: ...

    def opened(self, conn: Connection) -> bool: ...

    def closed(self, conn: Connection) -> None: ...


class Connection(RequestReader, asyncio.Protocol):
    """One client connection: reads with :class:`RequestReader`, answers in order, closes cleanly."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.limits = listener.limits
        self.transport: asyncio.Transport | None = None
        self.client_ip = None
        self.queue: deque[Pending] = deque()
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        self.lingering_until: float | None = None
        self.last_active = self.loop.time()
        self.started = self.last_active
        self.in_message = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._read_paused = False
        self._client_eof = False
        super().__init__()

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peer = self.transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else None
        if not self.listener.opened(self):
            self.reading = False
            self._send_error(HttpError(503, "too many connections"))

    def data_received(self, data: bytes) -> None:
        if not self.reading:
            return  # draining a closing connection, or bytes after a "Connection: close" request
        self.feed(data)

    def eof_received(self) -> bool:
        """The client half-closed: answer what was fully received, then close."""
        self._client_eof = True
        self.reading = False
        if self.task is None and not self.queue:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.reading = False
        self.queue.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self.listener.closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.last_active = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ---- answering ----------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self.listener.stopping

    def _no_keep_alive_for_last(self) -> None:
        if self.queue:
            self.queue[-1].keep_alive = False

    def _enqueue(self, pending: Pending) -> None:
        self.queue.append(pending)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        elif len(self.queue) >= MAX_PIPELINED and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _refuse(self, error: HttpError) -> None:
        """Stop reading; the error is answered after the requests before it."""
        self.reading = False
        self.started = None
        self.in_message = False
        if self.task is None and not self.queue:
            self._send_error(error)
        else:
            self.queue.append(Pending(None, False, False, error))

    def _maybe_continue(self) -> None:
        """``100 Continue`` only once every earlier answer is out, so it cannot land inside one."""
        if self._expect_continue and self.task is None and not self.queue and self.transport is not None:
            self._expect_continue = False
            self.transport.write(CONTINUE)

    async def _serve(self) -> None:
        try:
            while self.queue:
                pending = self.queue[0]
                if pending.error is not None:
                    self._send_error(pending.error)
                    return
                assert pending.request is not None
                try:
                    answer = self.listener.respond(pending.request)
                    resp = answer if isinstance(answer, Response) else await answer
                except Exception:
                    log.exception("answering %s %s failed", pending.request.method, pending.request.path_qs)
                    resp = error_answer(500, "internal error")
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                self.queue.popleft()
                keep_alive = pending.keep_alive and not self._stopping()
                transport.write(encode_response(resp, head=pending.head, keep_alive=keep_alive,
                                                http10=pending.http10))
                if not keep_alive:
                    self._close()
                    return
                if self.write_paused:
                    await self._wait_drained()
                if self._read_paused and len(self.queue) < MAX_PIPELINED // 2 and self.reading:
                    self._read_paused = False
                    transport.resume_reading()
        finally:
            self.task = None
            self._after_answers()

    async def _wait_drained(self) -> None:
        """A client that does not read its answers: wait (the sweeper aborts it after the keep-alive timeout)."""
        self._drained = self.loop.create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    def _after_answers(self) -> None:
        now = self.loop.time()
        self.last_active = now
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering_until is not None:
            return
        if self._client_eof or self.listener.stopping or not self.reading:
            self._close()
        else:
            if self.started is not None:
                self.started = now  # a request begun while we were busy: its clock starts now
            self._maybe_continue()

    def _send_error(self, error: HttpError) -> None:
        if self.transport is None or self.transport.is_closing() or self.lingering_until is not None:
            return
        self.transport.write(encode_response(error_answer(error.status, error.message), head=False,
                                             keep_alive=False, http10=False))
        self._close()

    def _close(self) -> None:
        """Shut our side down after the last answer and drain the client's bytes for :data:`LINGER` seconds."""
        self.reading = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._client_eof or not transport.can_write_eof():
            transport.close()
            return
        self.lingering_until = self.loop.time() + LINGER
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        transport.write_eof()

    # ---- timeouts and shutdown (called by the listener's sweeper) ------------------------
    def sweep(self, now: float) -> None:
        """Enforce the header, keep-alive and linger timeouts."""
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing():
            if self.write_paused and now - self.last_active > self.limits.keepalive_timeout:
                transport.abort()  # closing, but the client reads nothing: the buffer would never drain
            return
        if self.lingering_until is not None:
            if now > self.lingering_until:
                transport.abort()
        elif self.task is not None:
            if self.write_paused and now - self.last_active > self.limits.keepalive_timeout:
                transport.abort()
        elif self.started is not None:
            if now - self.started > self.limits.header_timeout:
                if self.in_message:
                    self._refuse(HttpError(408, "request not received in time"))
                else:
                    transport.close()  # opened and never sent a byte
        elif now - self.last_active > self.limits.keepalive_timeout:
            transport.close()

    def shutdown(self) -> None:
        """The server stops: close at once if idle, else after the answers already owed."""
        self.reading = False
        if self.task is None and not self.queue and self.transport is not None:
            if self.in_message:
                self._send_error(HttpError(503, "balancer is shutting down"))
            elif not self.transport.is_closing():
                self.transport.close()
