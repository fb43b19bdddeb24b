"""The aiohttp front end: admin routes served here, everything else handed to the dispatcher."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from balancer.dispatch import ClientRequest, Dispatcher

if TYPE_CHECKING:
    from balancer.server import Server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload, indent=1) + "\n", content_type="application/json")


def admin_routes(server: Server, token: str | None) -> list[web.RouteDef]:
    """``/backends`` and ``/metrics`` (behind the token if one is set), ``/healthz``, ``/readyz``."""

    def guarded(handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            if token is not None:
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return web.Response(
                        status=401, text='{"error": "bearer token required"}\n', content_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="pipeline-balancer"'},
                    )
            return await handler(request)

        return check

    async def backends(request: web.Request) -> web.Response:
        return _json(server.backends())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=server.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = server.readiness()
        return _json({"ready": ready, "reason": reason}, 200 if ready else 503)

    return [
        web.get("/backends", guarded(backends)),
        web.get("/metrics", guarded(metrics)),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]


def proxy_handler(dispatcher: Dispatcher) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # aiohttp answers 413 past client_max_size
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        resp = await dispatcher.handle(
            ClientRequest(request.method, request.raw_path, headers, body, peer[0] if peer else None)
        )
        out = web.Response(status=resp.status, body=resp.body)
        for name, value in resp.headers:
            out.headers.add(name, value)
        return out

    return handle


def build_app(server: Server, dispatcher: Dispatcher, token: str | None, with_admin: bool) -> web.Application:
    """The API app. Admin routes live here unless they have a port of their own (then only probes stay)."""
    app = web.Application(client_max_size=server.config.server.max_body_bytes)
    routes = admin_routes(server, token)
    app.add_routes(routes if with_admin else [r for r in routes if r.path in ("/healthz", "/readyz")])
    app.router.add_route("*", "/{tail:.*}", proxy_handler(dispatcher))
    return app


def build_admin_app(server: Server, token: str | None) -> web.Application:
    app = web.Application()
    app.add_routes(admin_routes(server, token))
    return app
