"""The aiohttp front end: admin routes served here, everything else handed to the dispatcher."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from balancer.admin import Admin
from balancer.dispatch import ClientRequest, Dispatcher
from balancer.proxy import Response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def to_web(resp: Response) -> web.Response:
    """A plain :class:`Response` as an aiohttp one, headers as given (duplicates kept)."""
    out = web.Response(status=resp.status, body=resp.body)
    for name, value in resp.headers:
        out.headers.add(name, value)
    return out


def admin_routes(admin: Admin) -> list[web.RouteDef]:
    """``/backends`` and ``/metrics`` (behind the token if one is set), ``/healthz``, ``/readyz``."""

    def route(path: str) -> web.RouteDef:
        async def handle(request: web.Request) -> web.StreamResponse:
            return to_web(admin.answer(path, request.headers.get("Authorization")))

        return web.get(path, handle)

    return [route(path) for path in admin.paths()]


def proxy_handler(dispatcher: Dispatcher) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # aiohttp answers 413 past client_max_size
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        resp = await dispatcher.handle(
            ClientRequest(request.method, request.raw_path, headers, body, peer[0] if peer else None)
        )
        return to_web(resp)

    return handle


def build_app(admin: Admin, dispatcher: Dispatcher, max_body_bytes: int) -> web.Application:
    """The API app: ``admin``'s routes (all, or only the probes when admin has a port of its own), then the proxy."""
    app = web.Application(client_max_size=max_body_bytes)
    app.add_routes(admin_routes(admin))
    # [\s\S]: also paths holding an encoded newline (%0a), which ".*" left to aiohttp's own plain-text 404
    app.router.add_route("*", "/{tail:[\\s\\S]*}", proxy_handler(dispatcher))
    return app


def build_admin_app(admin: Admin) -> web.Application:
    app = web.Application()
    app.add_routes(admin_routes(admin))
    return app
