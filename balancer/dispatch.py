"""What the balancer does with each client request (DESIGN §2, §3).

Plain request in, plain response out: the HTTP front ends (``balancer/front``,
asyncio Protocols + httptools, the default; or aiohttp, ``--front aiohttp``)
only adapt sockets to these calls, so both route and admit exactly alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from balancer.admission import FULL, Choice, live_source, retarget_device
from balancer.coalesce import Coalescer
from balancer.config import Config
from balancer.instance import IdPattern, parse_instance_id, requested_device
from balancer.logs import event
from balancer.metrics import LabelCache, Metrics
from balancer.pool import Ticket, WorkerPool
from balancer.proxy import (
    NotDelivered,
    Request,
    Response,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
    forwarded_headers,
)
from balancer.routes import ANY, BAD_METHOD, BAD_PATH, INSTANCE, START, STATUS_ALL, Route, classify
from balancer.status import BadStatusQuery, Merged, StatusQuery, merge_status_lists, parse_status_query
from balancer.worker import Worker

log = logging.getLogger("balancer.dispatch")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
WORKER_HEADER = "X-Pipeline-Worker"
MISSING_HEADER = "X-Pipeline-Balancer-Missing"
FALLBACK_HEADER = "X-Pipeline-Device-Fallback"
OWNER_LOOKUPS_AT_ONCE = 4
NOBODY: frozenset[str] = frozenset()
PLAIN_STATUS = StatusQuery()
NEGATIVE_CACHE_SIZE = 4096


@dataclass(slots=True)
class ClientRequest:
    """Built for every request: slots and no frozen-dataclass ``__setattr__`` cost; never mutated."""

    method: str
    path_qs: str
    """The raw request target: path and query, as the client sent them."""
    headers: list[tuple[str, str]]
    body: bytes
    client_ip: str | None


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload).encode() + b"\n"
    return Response(status, [("Content-Type", "application/json"), *(headers or [])], body)


def worker_error(status: int, message: str) -> Response:
    """An error shaped like the real worker's: a JSON string body."""
    return json_response(status, message)


class Dispatcher:
    def __init__(
        self, config: Config, pool: WorkerPool, upstream: Upstream, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.pool = pool
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self.ids = IdPattern(config.upstream.instance_id_pattern)
        self._lookups = asyncio.Semaphore(OWNER_LOOKUPS_AT_ONCE)
        self._unknown: OrderedDict[str, float] = OrderedDict()
        """Ids every worker said it does not know, until when: a client looping over bad ids
        must not make the balancer ask every worker each time."""
        self.rejection_listeners: list[Callable[[dict[str, Any]], None]] = []
        """Called with the 503 body of every refused start (MQTT events); must not block."""
        self.gate: Callable[[], Response | None] | None = None
        """When set and answering, every proxied request gets that answer instead (an HA standby replica)."""
        self._fan_outs: Coalescer[tuple[str, StatusQuery], ClientRequest, Merged] = Coalescer(self._fan_out)
        """Concurrent ``GET /pipelines/status`` share a fan-out that started after they arrived."""
        self._requests = LabelCache(metrics.requests)
        self._latency = LabelCache(metrics.upstream_latency)
        self._admitted = metrics.admissions.labels("admitted")

    async def handle(self, req: ClientRequest) -> Response:
        route = classify(req.method, req.path_qs.split("?", 1)[0])
        refused = self.gate() if self.gate is not None else None
        answer = refused if refused is not None else self._route(route, req)
        resp = answer if isinstance(answer, Response) else await answer
        method = req.method if req.method in KNOWN_METHODS else "OTHER"
        self._requests(route.kind, method, resp.status).inc()
        return resp

    def _route(self, route: Route, req: ClientRequest) -> Response | Coroutine[Any, Any, Response]:
        """The answer, or the coroutine that makes it (one coroutine frame less per request)."""
        if route.kind == START:
            return self._start(req)
        if route.kind == INSTANCE:
            return self._instance(route, req)
        if route.kind == STATUS_ALL:
            return self._status_all(req)
        if route.kind == ANY:
            return self._any(req)
        if route.kind == BAD_METHOD:
            return json_response(405, {"error": "method not allowed"}, [("Allow", route.allow)])
        if route.kind == BAD_PATH:
            return json_response(400, {"error": "bad path", "detail": route.detail})
        return json_response(404, {"error": "not found"})

    # ---- starts -------------------------------------------------------------------------
    async def _start(self, req: ClientRequest) -> Response:
        """Admit, reserve, send; move to another worker only if the start was never delivered."""
        device = requested_device(req.body)
        unreachable: list[str] = []
        while True:
            pick = self.pool.pick(device, frozenset(unreachable) if unreachable else NOBODY)
            if isinstance(pick, Choice):
                return self._reject(pick, device, unreachable)
            sent = req
            if pick.fallback is not None and device is not None:
                sent = ClientRequest(req.method, req.path_qs, req.headers,
                                     retarget_device(req.body, device, pick.fallback), req.client_ip)
            try:
                resp = await self._send(pick.worker, sent, "start", fresh=True)
            except NotDelivered as exc:
                self.pool.release(pick)
                self.pool.failed(pick.worker, str(exc))
                unreachable.append(pick.worker.key)
                self.metrics.start_retries.inc()
                event(log, "start not delivered, trying another worker", logging.WARNING,
                      worker=pick.worker.name, error=str(exc))
                continue
            except UpstreamError as exc:
                self.pool.release(pick)
                return self._upstream_failure(pick.worker, exc)
            except BaseException:
                self.pool.release(pick)
                raise
            self._settle(pick, resp, req.body)
            self._admitted.inc()
            if pick.fallback is not None:
                resp.headers.append((FALLBACK_HEADER, f"{device}->{pick.fallback}"))
            return resp

    def _settle(self, ticket: Ticket, resp: Response, body: bytes) -> None:
        instance_id = parse_instance_id(resp.body) if resp.status == 200 else None
        if instance_id is None:
            self.pool.release(ticket)
            return
        self.pool.confirm(ticket, instance_id, live_source(body))
        if not log.isEnabledFor(logging.INFO):
            return
        if ticket.fallback is None:
            event(log, "pipeline started", worker=ticket.worker.name, instance=instance_id)
        else:
            event(log, "pipeline started", worker=ticket.worker.name, instance=instance_id,
                  device_fallback=ticket.fallback)

    def _reject(self, choice: Choice, device: str | None, unreachable: list[str]) -> Response:
        pool_name = device or "any"
        in_pool = len(choice.passed) + len(unreachable)
        retry = [("Retry-After", str(self.config.admission.retry_after))]
        self.metrics.admissions.labels("rejected").inc()
        body: dict[str, Any]
        if in_pool == 0:
            self.metrics.rejections.labels("no_workers", pool_name).inc()
            body = {"error": "no workers" if device is None else f"no {device} workers",
                    "pool": pool_name, "workers": 0}
        else:
            full = sum(1 for r in choice.passed.values() if r.state == FULL)
            reason = "full" if full else "unavailable"
            self.metrics.rejections.labels(reason, pool_name).inc()
            body = {
                "error": "no worker has room" if device is None else f"no {device} worker has room",
                "pool": pool_name,
                "workers": in_pool,
                "full": full,
                "unavailable": in_pool - full,
                "reasons": {name: f"{r.state}: {r.reason}" for name, r in choice.passed.items()},
            }
            if unreachable:
                body["unreachable"] = [w.name for w in map(self.pool.get, unreachable) if w is not None]
        if choice.fallback is not None:
            body["fallback"] = choice.fallback
            body["error"] = f"no {device} or {choice.fallback} worker has room" if in_pool else (
                f"no {device} or {choice.fallback} workers")
        for listener in self.rejection_listeners:
            try:
                listener(body)
            except Exception:  # a dashboard's listener must never break routing
                log.exception("rejection listener failed")
        return json_response(503, body, retry)

    # ---- instance routes -------------------------------------------------------------------
    async def _instance(self, route: Route, req: ClientRequest) -> Response:
        if not self.ids.accepts(route.instance_id):
            return worker_error(400, route.unknown_answer)
        worker = self.pool.owner_of(route.instance_id) or await self._find_owner(route.instance_id)
        if worker is None:
            return worker_error(400, route.unknown_answer)
        return await self._forward(worker, req, "instance")

    async def _find_owner(self, instance_id: str) -> Worker | None:
        """Ask every worker (after a restart, or for an id whose MAC suffix matches no worker)."""
        now = self.clock()
        if self._unknown.get(instance_id, 0.0) > now:
            self.metrics.owner_lookups.labels("cached_unknown").inc()
            return None
        async with self._lookups:
            workers = self.pool.workers()
            probe = Request("GET", f"/pipelines/status/{instance_id}", [("Accept", "application/json")])
            results = await asyncio.gather(
                *(self._ask(w, probe, self.config.upstream.status_timeout) for w in workers)
            )
        for worker, resp in zip(workers, results, strict=True):
            if resp is not None and resp.status == 200:
                self.pool.learn_owner(instance_id, worker)
                self.metrics.owner_lookups.labels("found").inc()
                return worker
        self.metrics.owner_lookups.labels("unknown").inc()
        self._unknown[instance_id] = now + max(2.0, self.config.health.poll_interval * 2)
        while len(self._unknown) > NEGATIVE_CACHE_SIZE:
            self._unknown.popitem(last=False)
        return None

    # ---- fan-out and any-worker routes ------------------------------------------------------
    async def _status_all(self, req: ClientRequest) -> Response:
        """Every worker's list, merged; ``?state=`` filters and ``?worker=true`` names the worker."""
        path, _, query_string = req.path_qs.partition("?")
        if query_string:
            try:
                query = parse_status_query(query_string)
            except BadStatusQuery as exc:
                return json_response(400, exc.payload)
            path_qs = f"{path}?{query.forward_query}" if query.forward_query else path
        else:
            path_qs, query = path, PLAIN_STATUS
        merged = await self._fan_outs.get((path_qs, query), req)
        headers = [("Content-Type", "application/json")]
        if merged.missing:
            headers.append((MISSING_HEADER, ", ".join(merged.missing)))
        return Response(200, headers, merged.body if req.method != "HEAD" else b"")

    async def _fan_out(self, key: tuple[str, StatusQuery], req: ClientRequest) -> Merged:
        """One merged status read: every worker asked at once (shared by concurrent requests, see coalesce)."""
        path_qs, query = key
        workers = self.pool.workers()
        probe = Request("GET", path_qs, forwarded_headers(req.headers, req.client_ip))
        timeout = self.config.upstream.status_timeout
        results = await asyncio.gather(*(self._ask(w, probe, timeout) for w in workers))
        answers = [
            (w.name, r.body if r is not None and r.status == 200 else None)
            for w, r in zip(workers, results, strict=True)
        ]
        return merge_status_lists(answers, query)

    async def close(self) -> None:
        """Cancel merged status reads still in flight (shutdown, after the fronts have drained)."""
        await self._fan_outs.close()

    async def _any(self, req: ClientRequest) -> Response:
        for _ in range(max(1, len(self.pool.workers()))):
            worker = self.pool.pick_any()
            if worker is None:
                break
            try:
                return await self._forward(worker, req, "any", retry_undelivered=True)
            except NotDelivered as exc:
                self.pool.failed(worker, str(exc))
        return json_response(503, {"error": "no healthy worker"}, [("Retry-After", "1")])

    # ---- sending ------------------------------------------------------------------------------
    async def _send(self, worker: Worker, req: ClientRequest, route: str, fresh: bool = False) -> Response:
        upstream_req = Request(req.method, req.path_qs, forwarded_headers(req.headers, req.client_ip), req.body)
        started = time.perf_counter()
        try:
            resp = await self.upstream.send(worker.spec.url, upstream_req, self.config.upstream.timeout, fresh)
        except UpstreamError as exc:
            kind = "not_delivered" if isinstance(exc, NotDelivered) else (
                "timeout" if isinstance(exc, UpstreamTimeout) else "failed")
            self.metrics.upstream_errors.labels(kind).inc()
            raise
        self._latency(route).observe(time.perf_counter() - started)
        resp.headers.append((WORKER_HEADER, worker.name))  # the upstream's answer is ours to change
        return resp

    async def _forward(
        self, worker: Worker, req: ClientRequest, route: str, retry_undelivered: bool = False
    ) -> Response:
        try:
            return await self._send(worker, req, route)
        except NotDelivered as exc:
            if retry_undelivered:
                raise
            self.pool.failed(worker, str(exc))
            return self._upstream_failure(worker, exc)
        except UpstreamError as exc:
            return self._upstream_failure(worker, exc)

    async def _ask(self, worker: Worker, req: Request, timeout: float) -> Response | None:
        """A fan-out leg: any failure is just a missing answer."""
        try:
            return await self.upstream.send(worker.spec.url, req, timeout)
        except UpstreamError:
            return None

    def _upstream_failure(self, worker: Worker, exc: UpstreamError) -> Response:
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        error = "worker timed out" if status == 504 else "worker unreachable or broken"
        event(log, error, logging.WARNING, worker=worker.name, detail=str(exc))
        return json_response(status, {"error": error, "worker": worker.name, "detail": str(exc)})
