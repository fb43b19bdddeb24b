"""Sending a request to a worker: one small interface, so a faster client can replace this one.

Failures come in three kinds, because they call for different answers:
:class:`NotDelivered` (the worker never got the request: safe to try another
worker), :class:`UpstreamTimeout` (504) and :class:`UpstreamFailed` (502).
A start that may have reached a worker is never replayed: that could run the
same pipeline twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)
"""RFC 9110 §7.6.1: headers that describe one connection, not the message."""


@dataclass(slots=True)
class Request:
    """Built per forwarded request: slots, and no frozen-dataclass ``__setattr__`` cost; never mutated."""

    method: str
    path_qs: str
    """Raw path and query, forwarded as the client sent them."""
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass(slots=True)
class Response:
    """Built per answer (slots, not frozen, for speed). ``headers`` are end-to-end only: each front frames."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class UpstreamError(Exception):
    """A worker could not give an answer."""


class NotDelivered(UpstreamError):
    """The request never reached the worker (connect refused, reset or timed out)."""


class UpstreamTimeout(UpstreamError):
    """The worker took longer than the timeout to answer."""


class UpstreamFailed(UpstreamError):
    """The worker closed the connection or sent something that is not HTTP."""


class Upstream(Protocol):
    async def send(self, base_url: str, request: Request, timeout: float, fresh: bool = False) -> Response:
        """Send and read the whole answer, a new :class:`Response` the caller may change.

        ``fresh``: a start, whose "not delivered" must be exact (see each implementation)."""

    async def close(self) -> None: ...


def end_to_end(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers without the hop-by-hop ones, those the Connection header names, and ``drop``."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    skip = HOP_BY_HOP | named | {d.lower() for d in drop}
    return [(n, v) for n, v in headers if n.lower() not in skip]


_NOT_FORWARDED = HOP_BY_HOP | {"content-length", "x-forwarded-for", "host", "expect"}
"""Framing and Host are the upstream client's; ``Expect`` was answered by the front, which holds the body."""


def forwarded_headers(headers: Iterable[tuple[str, str]], client_ip: str | None) -> list[tuple[str, str]]:
    """What goes to the worker: end-to-end headers plus ``X-Forwarded-For``. One pass: it runs per request."""
    out: list[tuple[str, str]] = []
    prior: list[str] = []
    named: set[str] | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in _NOT_FORWARDED:
            if lowered == "x-forwarded-for":
                prior.append(value)
            elif lowered == "connection":
                named = (named or set()) | {token.strip().lower() for token in value.split(",")}
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    if client_ip:
        prior.append(client_ip)
    if prior:
        out.append(("X-Forwarded-For", ", ".join(prior)))
    return out


class AiohttpUpstream:
    """Pooled keep-alive connections for everything; a fresh connection for starts."""

    def __init__(self, connect_timeout: float, limit_per_host: int = 64) -> None:
        self._connect_timeout = connect_timeout
        self._pooled = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host, ttl_dns_cache=None),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )

    async def send(self, base_url: str, request: Request, timeout: float, fresh: bool = False) -> Response:
        session = self._fresh if fresh else self._pooled
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=min(self._connect_timeout, timeout))
        try:
            async with session.request(
                request.method,
                base_url + request.path_qs,
                headers=request.headers,
                data=request.body if request.body or request.method in ("POST", "PUT") else None,
                timeout=limits,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                headers = end_to_end(_raw_headers(resp), drop=("content-length",))
                return Response(resp.status, headers, body)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise NotDelivered(f"cannot connect: {exc}") from None
        except TimeoutError:
            raise UpstreamTimeout(f"no answer within {timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._pooled.close()
        await self._fresh.close()


def _raw_headers(resp: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    """The worker's headers as sent, duplicates and order kept."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
