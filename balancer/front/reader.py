"""Reading requests off a client connection with llhttp (httptools): framing checks and limits.

This half of a :class:`~balancer.front.connection.Connection` only reads. It
turns bytes into :class:`Pending` requests, or into an :class:`HttpError` for
anything the front refuses: smuggling attempts (llhttp rejects conflicting or
duplicate lengths, bad chunks, obs-fold, bare LF), other transfer codings,
HTTP versions other than 1.0/1.1, a missing or repeated Host, heads and
bodies over their limits, expectations other than ``100-continue``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httptools

from balancer.dispatch import ClientRequest
from balancer.front.wire import HttpError

log = logging.getLogger("balancer.front")

MAX_HEADERS = 100
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


class Pending:
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


class RequestReader:
    """Parse state and httptools callbacks. The connection provides the hooks at the bottom."""

    loop: asyncio.AbstractEventLoop
    limits: Limits
    client_ip: str | None
    reading: bool
    """False once no further request will be read (close requested, error, shutdown)."""
    started: float | None
    """When the request being read began (the first one: when the connection opened)."""
    in_message: bool

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
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
        self._method = ""
        self._http10 = False
        self._expect_continue = False

    def feed(self, data: bytes) -> None:
        """Parse ``data``; complete requests go to :meth:`_enqueue`, refusals to :meth:`_refuse`."""
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
            self._no_keep_alive_for_last()
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
        keep_alive = self.parser.should_keep_alive() and self.reading and not self._stopping()
        request = ClientRequest(self._method, self._url.decode("latin-1"), self._headers, body, self.client_ip)
        self.in_message = False
        self.started = None
        self._expect_continue = False
        if not keep_alive:
            self.reading = False
        self._enqueue(Pending(request, keep_alive, self._http10))

    # ---- hooks the connection provides ---------------------------------------------------
    def _enqueue(self, pending: Pending) -> None:
        raise NotImplementedError

    def _refuse(self, error: HttpError) -> None:
        raise NotImplementedError

    def _maybe_continue(self) -> None:
        raise NotImplementedError

    def _no_keep_alive_for_last(self) -> None:
        raise NotImplementedError

    def _stopping(self) -> bool:
        raise NotImplementedError
