"""One client connection of the fast front: llhttp (httptools) parsing, limits, keep-alive, pipelining.

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
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from balancer.dispatch import ClientRequest
from balancer.front.wire import CONTINUE, HttpError, encode_response, error_answer
from balancer.proxy import Response

log = logging.getLogger("balancer.front")

MAX_HEADERS = 100
MAX_PIPELINED = 16
"""Requests read ahead of their answers before reading pauses."""
LINGER = 2.0
"""Seconds a closing connection keeps draining the client's bytes after our last answer."""
_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})


class _StopParsing(Exception):
    """Raised from a callback to leave the rest of the bytes unparsed (no further request is wanted)."""


@dataclass(frozen=True)
class Limits:
    max_body: int
    max_head: int
    """Bytes of request line plus headers (431 beyond)."""
    header_timeout: float
    """Seconds from a request's first byte (or the connection's opening) to its last."""
    keepalive_timeout: float
    """Seconds an idle keep-alive connection stays open."""


class Listener(Protocol):
    """What a connection needs from the listener that owns it."""

    loop: asyncio.AbstractEventLoop
    limits: Limits
    stopping: bool

    def respond(self, request: ClientRequest) -> Response | Coroutine[Any, Any, Response]: ...

    def opened(self, conn: Connection) -> bool: ...

    def closed(self, conn: Connection) -> None: ...


class _Pending:
    """A parsed request waiting for its turn, or an error to send in its place."""

    __slots__ = ("error", "head", "http10", "keep_alive", "request")

    def __init__(
        self, request: ClientRequest | None, keep_alive: bool, http10: bool, error: HttpError | None = None
    ) -> None:
        self.request = request
        self.keep_alive = keep_alive
        self.http10 = http10
        self.head = request is not None and request.method == "HEAD"
        self.error = error


class Connection(asyncio.Protocol):
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.limits = listener.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip: str | None = None
        self.queue: deque[_Pending] = deque()
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        """False once no further request will be read (close requested, error, shutdown)."""
        self.lingering_until: float | None = None
        self.last_active = self.loop.time()
        self.started: float | None = self.last_active
        """When the request being read began (the first one: when the connection opened)."""
        self.in_message = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._read_paused = False
        self._client_eof = False
        self._progress = False
        self._stall = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._in_head = False
        self._hosts = 0
        self._length: int | None = None
        self._te: bytes | None = None
        self._expect: bytes | None = None
        self._authorization: str | None = None
        self._method = ""
        self._http10 = False
        self._expect_continue = False

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
        self._progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopParsing):
                return
            if isinstance(cause, HttpError):
                self._refuse(cause)
            else:
                log.error("request parsing failed", exc_info=cause)
                self._refuse(HttpError(500, "internal error while reading the request"))
            return
        except httptools.HttpParserUpgrade:
            self.reading = False  # answered as a plain request, then closed: no protocol switch
            if self.queue:
                self.queue[-1].keep_alive = False
            return
        except httptools.HttpParserError as exc:
            if self.reading:
                self._refuse(HttpError(400, f"malformed request: {exc}"))
            return
        if self._in_head and not self._progress:
            # one header line growing without end: httptools buffers it, so bound it here
            self._stall += len(data)
            if self._stall + self._head_size > self.limits.max_head:
                self._refuse(HttpError(431, "request headers too large"))

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

    # ---- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self.reading:
            raise _StopParsing
        self._reset_message()
        self._in_head = True
        self.in_message = True
        self._progress = True
        self._stall = 0
        if self.started is None:
            self.started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        self._progress = True
        self._stall = 0
        if self._head_size > self.limits.max_head:
            raise HttpError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailer fields of a chunked body: dropped, never merged into the headers
        self._progress = True
        self._stall = 0
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_head or len(self._headers) >= MAX_HEADERS:
            raise HttpError(431, "request headers too large")
        lowered = name.lower()
        if lowered in _SPECIAL:
            self._special(lowered, value)
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _special(self, lowered: bytes, value: bytes) -> None:
        if lowered == b"host":
            self._hosts += 1
        elif lowered == b"content-length":
            self._length = int(value)  # llhttp has checked: digits, and only one
        elif lowered == b"transfer-encoding":
            self._te = value if self._te is None else self._te + b"," + value
        elif lowered == b"expect":
            self._expect = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise HttpError(505, f"HTTP/{version} is not supported")
        self._http10 = http10 = version == "1.0"
        self._method = parser.get_method().decode("ascii")
        if self._hosts > 1 or (self._hosts == 0 and not http10):
            raise HttpError(400, "exactly one Host header is required")
        has_body = False
        if self._te is not None:
            if http10:
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if self._te.strip().lower() != b"chunked":
                raise HttpError(501, "only the chunked transfer coding is supported")
            has_body = True
        elif self._length is not None:
            if self._length > self.limits.max_body:
                raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")
            has_body = self._length > 0
        if parser.should_upgrade():
            if has_body:
                raise HttpError(400, "an upgrade request may not carry a body")
            return
        if self._expect is not None:
            if self._expect.strip().lower() != b"100-continue":
                raise HttpError(417, "only 100-continue is supported")
            if has_body and not http10:
                self._expect_continue = True
                self._maybe_continue()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body:
            raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        keep_alive = self.parser.should_keep_alive() and self.reading and not self.listener.stopping
        request = ClientRequest(self._method, self._url.decode("latin-1"), self._headers, body, self.client_ip)
        self.in_message = False
        self.started = None
        self._expect_continue = False
        if not keep_alive:
            self.reading = False
        self._enqueue(_Pending(request, keep_alive, self._http10))

    # ---- answering ----------------------------------------------------------------------
    def _enqueue(self, pending: _Pending) -> None:
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
        if self.task is None and not self.queue:
            self._send_error(error)
        else:
            self.queue.append(_Pending(None, False, False, error))

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
                keep_alive = pending.keep_alive and not self.listener.stopping
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
        if self.transport is None or self.transport.is_closing():
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
        if transport is None or transport.is_closing():
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
