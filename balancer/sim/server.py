"""The REST API of the real Pipeline Server (connexion 2 on Flask), served by aiohttp.

Bodies are what connexion writes: JSON with two-space indentation, sorted keys
and a trailing newline; a handler's error string is a JSON string with status
400; framework errors (bad JSON, wrong content type, schema failures, unknown
routes, wrong methods, oversized bodies) are ``application/problem+json``
documents ``{"detail", "status", "title", "type": "about:blank"}``. No error
ever shows a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from balancer.sim import schema
from balancer.sim.catalog import Catalog
from balancer.sim.engine import Engine
from balancer.sim.runner import Runner

log = logging.getLogger("balancer.sim.server")

MAX_BODY = 10 * 1024
BAD_INSTANCE = "Invalid pipeline, version or instance"
BAD_PIPELINE = "Invalid Pipeline or Version"
NOT_FOUND = ("The requested URL was not found on the server. If you entered the URL manually "
             "please check your spelling and try again.")
NOT_ALLOWED = "The method is not allowed for the requested URL."
TOO_LARGE = "The data value transmitted exceeds the capacity limit."

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
RUNNER: web.AppKey[Runner] = web.AppKey("runner", Runner)
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog", Catalog)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(data).encode(), content_type="application/json")


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"detail": detail, "status": status, "title": HTTPStatus(status).phrase, "type": "about:blank"}
    if status == 413:
        body["title"] = "Request Entity Too Large"
    return web.Response(status=status, body=dumps(body).encode(), headers=headers,
                        content_type="application/problem+json")


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Framework errors as connexion's problem documents; anything unexpected as its 500 string."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return problem(405, NOT_ALLOWED, {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPRequestEntityTooLarge:
        return problem(413, TOO_LARGE)
    except web.HTTPException as exc:
        if exc.status == 404:
            return problem(404, NOT_FOUND)
        return problem(exc.status, exc.reason)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return reply("Unexpected error", 500)


# ---- handlers ---------------------------------------------------------------
async def get_models(request: web.Request) -> web.Response:
    return reply(request.app[CATALOG].models)


async def get_pipelines(request: web.Request) -> web.Response:
    return reply(request.app[CATALOG].describe_all())


async def get_pipeline(request: web.Request) -> web.Response:
    found = request.app[CATALOG].describe(request.match_info["name"], request.match_info["version"])
    return reply(found) if found is not None else reply(BAD_PIPELINE, 400)


async def _read_json(request: web.Request) -> Any:
    """connexion's body check: 413 over 10 KiB, 400 bad JSON, 415 not JSON, 400 schema failure."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    raw = await request.read()
    mimetype = request.content_type.lower()
    is_json = mimetype == "application/json" or mimetype.endswith("+json")
    data = None
    if is_json and raw:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
    if data is None and raw:
        if is_json:
            raise Problem(problem(400, "Request body is not valid JSON"))
        header = request.headers.get("Content-Type", "")
        raise Problem(problem(415, f"Invalid Content-type ({header}), expected JSON data"))
    error = schema.check_request(data)
    if error is not None:
        raise Problem(problem(400, error.detail()))
    return data


class Problem(Exception):
    """Carries a finished error response out of the body check."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def post_pipeline(request: web.Request) -> web.Response:
    try:
        body = await _read_json(request)
    except Problem as exc:
        return exc.response
    name, version = request.match_info["name"], request.match_info["version"]
    config = request.app[CATALOG].get(name, version)
    if config is None:
        return reply(BAD_PIPELINE, 400)
    normalized, error = schema.normalize(body, config.get("parameters"))
    if error is not None:
        return reply(error, 400)
    normalized["pipeline"] = {"name": name, "version": version}
    instance = request.app[ENGINE].create(name, version, normalized)
    request.app[RUNNER].sync()
    log.info("instance %s of %s/%s: %s", instance.id, name, version, instance.state)
    return reply(instance.id)


def _owned(request: web.Request) -> str | None:
    """The instance id in the path, if it exists (and belongs to the path's pipeline, when given)."""
    instance = request.app[ENGINE].get(request.match_info["instance_id"])
    if instance is None:
        return None
    name, version = request.match_info.get("name"), request.match_info.get("version")
    if name is not None and (instance.name, instance.version) != (name, version):
        return None
    return instance.id


async def get_statuses(request: web.Request) -> web.Response:
    return reply(request.app[ENGINE].statuses())


async def get_status(request: web.Request) -> web.Response:
    instance_id = _owned(request)
    if instance_id is None:
        bad = BAD_INSTANCE if "name" in request.match_info else "Invalid instance"
        return reply(bad, 400)
    return reply(request.app[ENGINE].status(instance_id))


async def get_summary(request: web.Request) -> web.Response:
    instance_id = _owned(request)
    instance = request.app[ENGINE].get(instance_id) if instance_id else None
    if instance is None:
        return reply(BAD_INSTANCE, 400)
    config = request.app[CATALOG].get(instance.name, instance.version) or {}
    return reply({
        "id": instance.id,
        "request": instance.request,
        "type": config.get("type", "GStreamer"),
        "launch_command": instance.launch_command,
    })


async def delete_instance(request: web.Request) -> web.Response:
    instance_id = _owned(request)
    status = request.app[ENGINE].stop(instance_id) if instance_id else None
    if status is None:
        return reply(BAD_INSTANCE, 400)
    request.app[RUNNER].sync()
    log.info("instance %s stopped (was %s)", instance_id, status["state"])
    return reply(status)


def make_app(engine: Engine, runner: Runner, catalog: Catalog) -> web.Application:
    """Routes in the order Flask would prefer them: literal ``status`` before ``{instance_id}``."""
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[ENGINE], app[RUNNER], app[CATALOG] = engine, runner, catalog
    r = app.router
    r.add_get("/models", get_models)
    r.add_get("/pipelines", get_pipelines)
    r.add_get("/pipelines/status", get_statuses)
    r.add_get("/pipelines/status/{instance_id}", get_status)
    r.add_get("/pipelines/{instance_id}", get_summary)
    r.add_delete("/pipelines/{instance_id}", delete_instance)
    r.add_get("/pipelines/{name}/{version}", get_pipeline)
    r.add_post("/pipelines/{name}/{version}", post_pipeline)
    r.add_get("/pipelines/{name}/{version}/{instance_id}", get_summary)
    r.add_delete("/pipelines/{name}/{version}/{instance_id}", delete_instance)
    r.add_get("/pipelines/{name}/{version}/{instance_id}/status", get_status)
    return app
