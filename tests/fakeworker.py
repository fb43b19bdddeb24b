"""A scriptable worker for fault tests: a real aiohttp server on loopback, run in its own thread.

It speaks enough of the Pipeline Server API for the balancer (status list, start,
instance status) and can be told to misbehave: answer slowly, drop the
connection after reading a start, answer garbage, or never answer. It also
answers one definition chunked, ``/models`` with a chosen status (204/304 have
no body), and records the headers and body of every start.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

from tests.procs import free_port


class FakeWorker:
    def __init__(self, host: str = "127.0.0.1", keepalive_timeout: float = 75.0) -> None:
        self.host = host
        self.keepalive_timeout = keepalive_timeout  # seconds before it closes an idle keep-alive connection
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.mac = uuid.uuid4().hex[:12]
        self.instances: list[dict[str, Any]] = []
        self.starts_received = 0
        self.post_delay = 0.0
        self.post_close = False
        self.status_body: bytes | None = None
        self.status_delay = 0.0
        self.status_code = 200  # e.g. 500: the status list answers this code (with status_body if set)
        self.start_error_echo = False  # a start answers 400 with a message that echoes the source URI
        self.lookup_delay = 0.0  # seconds GET /pipelines/status/{id} takes
        self.requests: Counter[str] = Counter()  # "METHOD path" of every request received
        self.lookups_in_flight = 0
        self.max_lookups_in_flight = 0
        self.definitions_delay = 0.0  # seconds GET /pipelines takes
        self.drop_definitions = 0  # the next N GET /pipelines: read, then close the connection without a byte
        self.models_status = 200  # GET /models answers this (204 and 304 without a body)
        self.starts_seen: list[tuple[dict[str, str], bytes]] = []  # (headers, body) of every start received
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # ---- control from the test thread -----------------------------------------------
    def start(self) -> FakeWorker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ---- the server -------------------------------------------------------------------------
    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/pipelines/status", self._status)
        app.router.add_get("/pipelines", self._definitions)
        app.router.add_post("/pipelines/{name}/{version}", self._start)
        app.router.add_get("/pipelines/status/{id}", self._one)
        app.router.add_get("/pipelines/{name}/{version}", self._definition_chunked)
        app.router.add_get("/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests[f"{request.method} {request.path}"] += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def _status(self, request: web.Request) -> web.StreamResponse:
        if self.status_delay:
            await asyncio.sleep(self.status_delay)
        if self.status_body is not None:
            return web.Response(body=self.status_body, status=self.status_code, content_type="application/json")
        if self.status_code != 200:
            return web.json_response({"detail": "broken on purpose"}, status=self.status_code)
        return web.json_response(self.instances)

    async def _definitions(self, request: web.Request) -> web.Response:
        if self.drop_definitions > 0:
            self.drop_definitions -= 1
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
        if self.definitions_delay:
            await asyncio.sleep(self.definitions_delay)
        return web.json_response([{"name": "object_detection", "version": "person_vehicle_bike",
                                   "type": "GStreamer", "description": "fake"}])

    async def _start(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.starts_received += 1
        self.starts_seen.append(({k.lower(): v for k, v in request.headers.items()}, body))
        if self.start_error_echo:
            uri = json.loads(body).get("source", {}).get("uri", "")
            return web.json_response(f"Invalid source: cannot open {uri}", status=400)
        if self.post_close:
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
        if self.post_delay:
            await asyncio.sleep(self.post_delay)
        instance_id = uuid.uuid1().hex[:20] + self.mac
        self.instances.append({"id": instance_id, "state": "RUNNING", "avg_fps": 30.0, "elapsed_time": 1.0,
                               "start_time": 1.0, "message": ""})
        return web.Response(text=json.dumps(instance_id) + "\n", content_type="application/json")

    async def _definition_chunked(self, request: web.Request) -> web.StreamResponse:
        """One pipeline definition, sent with chunked transfer coding in three pieces."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        name, version = request.match_info["name"], request.match_info["version"]
        for piece in ('{"name": ', json.dumps(name) + ', "version": ', json.dumps(version) + "}\n"):
            await resp.write(piece.encode())
        await resp.write_eof()
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_status in (204, 304):
            return web.Response(status=self.models_status, headers={"ETag": '"m1"'})
        return web.json_response([], status=self.models_status)

    async def _one(self, request: web.Request) -> web.Response:
        self.lookups_in_flight += 1
        self.max_lookups_in_flight = max(self.max_lookups_in_flight, self.lookups_in_flight)
        try:
            if self.lookup_delay:
                await asyncio.sleep(self.lookup_delay)
            for inst in self.instances:
                if inst["id"] == request.match_info["id"]:
                    return web.json_response(inst)
            return web.json_response("Invalid instance", status=400)
        finally:
            self.lookups_in_flight -= 1
