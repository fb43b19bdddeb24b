"""HTTP/1.1 bytes the fast front writes: status lines, framing, error answers. Pure functions."""

from __future__ import annotations

import json
from http import HTTPStatus

from balancer.proxy import Response

NO_BODY_STATUSES = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


def encode_response(resp: Response, *, head: bool, keep_alive: bool, http10: bool) -> bytes:
    """Status line, headers, our own framing, body.

    ``resp.headers`` are end-to-end headers only (the dispatcher and the upstream
    drop framing and hop-by-hop ones); the front adds ``Content-Length`` and
    ``Connection``. No body for HEAD, 1xx, 204 and 304; a HEAD answer keeps the
    length of the body it would have had when that is known.
    """
    status = resp.status
    line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} {_reason(status)}\r\n"
    body = resp.body
    fields = "".join([f"{n}: {v}\r\n" for n, v in resp.headers])
    if status in NO_BODY_STATUSES or status < 200:
        body = b""
        length = ""
    elif head:
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        body = b""
    else:
        length = f"Content-Length: {len(body)}\r\n"
    connection = "Connection: close\r\n" if not keep_alive else ("Connection: keep-alive\r\n" if http10 else "")
    head_bytes = f"{line}{fields}{length}{connection}\r\n".encode("latin-1", "replace")
    return head_bytes + body if body else head_bytes


def error_answer(status: int, message: str) -> Response:
    """A short JSON error from the front itself (never a traceback)."""
    body = json.dumps({"error": message}).encode() + b"\n"
    return Response(status, [("Content-Type", "application/json")], body)


class HttpError(Exception):
    """A request the front refuses: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
