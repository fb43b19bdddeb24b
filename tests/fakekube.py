"""A fake Kubernetes API server for pods, speaking the real wire protocol over HTTP.

It serves ``GET /api/v1/namespaces/{ns}/pods``: a ``PodList`` (list) or, with ``watch=true`` (any
case, kubernetes_asyncio sends ``True``), a chunked stream of ``{"type", "object"}`` JSON lines.
It keeps a global resourceVersion and an event history, so a watch resumes from any version it
still has; versions older than the last :meth:`FakeKube.compact` are ``410 Gone`` (as an HTTP
status or an in-stream ``ERROR`` event, see ``gone_mode``). Label selectors are applied on the
server side as the API server does: an object whose labels stop matching is sent as ``DELETED``.

Its own selector code is deliberately separate from ``balancer.discovery.pods`` (equality and
existence clauses only), so the contract tests do not check the code under test against itself.

Controls are plain methods (``add_pod``, ``set_ready``, ``begin_delete`` …) for tests on the same
event loop; :class:`FakeKubeThread` runs one in its own thread for tests that start processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "fake-token"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
"""What Go's ``time.Parse(RFC3339Micro, …)`` accepts for a ``MicroTime``: exactly six fraction digits."""


def _selector_matches(labels: dict[str, str], selector: str) -> bool:
    for clause in filter(None, (c.strip() for c in selector.split(","))):
        if "!=" in clause:
            key, value = (p.strip() for p in clause.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in clause:
            key, value = (p.strip() for p in clause.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif clause.startswith("!"):
            if clause[1:].strip() in labels:
                return False
        elif clause not in labels:
            return False
    return True


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Watcher:
    namespace: str
    selector: str
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass
class Change:
    """One entry of the history: the object before (None if new) and after."""

    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


_END = "end"  # finish the stream cleanly (zero-length chunk)
_ABORT = "abort"  # cut the connection mid-stream


class FakeKube:
    def __init__(self, namespace: str = "pipeline-server", host: str = "127.0.0.1") -> None:
        self.namespace = namespace
        self.host = host
        self.port = 0
        self.rv = 100
        self.compacted = 0
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[Change] = []
        self.watchers: list[Watcher] = []
        self.requests: list[dict[str, Any]] = []
        self.gone_mode = "event"  # or "http": how a watch from a compacted version is refused
        self.fail_status = 0  # answer every request with this status (e.g. 503) while set
        self.server_side_selector = True  # False: send every pod's events (a sloppy server)
        self.hold = False  # True: record changes but tell no open watch (a lagging watch cache)
        self._runner: web.AppRunner | None = None
        self._streams: set[web.StreamResponse] = set()
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}  # coordination.k8s.io/v1, by (namespace, name)
        self.lease_requests: list[dict[str, Any]] = []
        self.lease_fail_status = 0  # answer every Lease request with this status (e.g. 503) while set

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (again) on ``self.port`` (a free port the first time)."""
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_route("*", LEASES, self._leases)
        app.router.add_route("*", LEASES + "/{name}", self._lease)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and cut every connection: clients get refused until :meth:`start`."""
        for w in self.watchers:
            w.queue.put_nowait(_ABORT)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({  # JSON is YAML
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    # -- pods -----------------------------------------------------------------------------------------

    def add_pod(self, name: str, ip: str | None = None, ready: bool = False, labels: dict[str, str] | None = None,
                node: str = "node-1", namespace: str | None = None, owner: str | None = None) -> dict[str, Any]:
        ns = namespace or self.namespace
        if (ns, name) in self.pods:
            raise ValueError(f"pod {name} exists")
        meta: dict[str, Any] = {
            "name": name, "namespace": ns, "uid": str(uuid.uuid4()),
            "labels": {"app": "pipeline-server"} if labels is None else dict(labels),
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if owner:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": owner,
                                        "uid": str(uuid.uuid4()), "controller": True}]
        pod = {
            "kind": "Pod", "apiVersion": "v1", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "pipeline-server", "image": "intel/dlstreamer"}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]},
        }
        self._set_status(pod, ip, ready)
        return self._record("ADDED", None, pod)

    def modify(self, name: str, change: Callable[[dict[str, Any]], None], namespace: str | None = None
               ) -> dict[str, Any]:
        old = self.pods[(namespace or self.namespace, name)]
        new = copy.deepcopy(old)
        change(new)
        return self._record("MODIFIED", old, new)

    def set_ready(self, name: str, ready: bool = True) -> dict[str, Any]:
        def change(pod: dict[str, Any]) -> None:
            self._set_status(pod, pod["status"].get("podIP"), ready)
        return self.modify(name, change)

    def set_ip(self, name: str, ip: str | None, ready: bool = False) -> dict[str, Any]:
        return self.modify(name, lambda pod: self._set_status(pod, ip, ready))

    def set_labels(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        return self.modify(name, lambda pod: pod["metadata"].__setitem__("labels", dict(labels)))

    def begin_delete(self, name: str) -> dict[str, Any]:
        """Graceful deletion, first half: ``deletionTimestamp`` set, the pod still exists."""
        def change(pod: dict[str, Any]) -> None:
            pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            pod["metadata"]["deletionGracePeriodSeconds"] = 30
        return self.modify(name, change)

    def finish_delete(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """Graceful deletion, second half: the pod is gone (``DELETED``)."""
        old = self.pods[(namespace or self.namespace, name)]
        return self._record("DELETED", old, copy.deepcopy(old))

    def recreate(self, name: str, ip: str, ready: bool = True) -> dict[str, Any]:
        """The pod is deleted and a new one with the same name (new UID, new IP) appears."""
        old = self.pods[(self.namespace, name)]
        self.begin_delete(name)
        self.finish_delete(name)
        return self.add_pod(name, ip=ip, ready=ready, labels=old["metadata"]["labels"],
                            node=old["spec"]["nodeName"])

    def bump(self, n: int = 1) -> int:
        """Other objects changed: the version moves on with nothing for our watchers."""
        self.rv += n
        return self.rv

    def bookmark(self) -> int:
        for w in self.watchers:
            if w.bookmarks:
                w.queue.put_nowait({"type": "BOOKMARK", "object": {
                    "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}})
        return self.rv

    def compact(self) -> None:
        """Forget the history: watching from any older version is now ``410 Gone``."""
        self.compacted = self.rv
        self.history.clear()

    def expire_streams(self) -> None:
        """Compact and tell every open watch, in-stream, that its version is gone."""
        self.compact()
        error = {"type": "ERROR", "object": status_object(
            410, "Expired", f"too old resource version: 1 ({self.rv})")}
        for w in self.watchers:
            w.queue.put_nowait(error)
            w.queue.put_nowait(_END)

    def drop_streams(self, abrupt: bool = False) -> None:
        """End every open watch: cleanly (as ``timeoutSeconds`` does) or by cutting the connection."""
        for w in self.watchers:
            w.queue.put_nowait(_ABORT if abrupt else _END)

    def watch_requests(self) -> list[dict[str, str]]:
        return [r["query"] for r in self.requests if r["watch"]]

    def list_requests(self) -> list[dict[str, str]]:
        return [r["query"] for r in self.requests if not r["watch"]]

    async def wait_watchers(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``n`` watch streams are open."""
        deadline = time.monotonic() + timeout
        while len(self.watchers) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.watchers)} watchers, wanted {n}")
            await asyncio.sleep(0.01)

    # -- internals ------------------------------------------------------------------------------------

    @staticmethod
    def _set_status(pod: dict[str, Any], ip: str | None, ready: bool) -> None:
        status = pod["status"]
        if ip:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
            status["phase"] = "Running"
        else:
            status.pop("podIP", None)
            status.pop("podIPs", None)
        conditions = [c for c in status["conditions"] if c["type"] not in ("Ready", "ContainersReady")]
        flag = "True" if ready and ip else "False"
        conditions += [{"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}]
        status["conditions"] = conditions

    def _record(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        key = (new["metadata"]["namespace"], new["metadata"]["name"])
        if kind == "DELETED":
            del self.pods[key]
        else:
            self.pods[key] = new
        change = Change(self.rv, kind, copy.deepcopy(old), copy.deepcopy(new))
        self.history.append(change)
        for w in [] if self.hold else self.watchers:
            event = self._event_for(w, change)
            if event:
                w.queue.put_nowait(event)
        return copy.deepcopy(new)

    def _matches(self, w: Watcher, pod: dict[str, Any] | None) -> bool:
        if pod is None or pod["metadata"]["namespace"] != w.namespace:
            return False
        return not self.server_side_selector or _selector_matches(pod["metadata"].get("labels") or {}, w.selector)

    def _event_for(self, w: Watcher, change: Change) -> dict[str, Any] | None:
        """What a watcher with a namespace and selector sees of one change (as the API server does)."""
        before, after = self._matches(w, change.old), self._matches(w, change.new)
        if change.type == "DELETED":
            kind = "DELETED" if after else None
        elif before and after:
            kind = "MODIFIED"
        elif after:
            kind = "ADDED"
        elif before:
            kind = "DELETED"  # left the selection
        else:
            kind = None
        return {"type": kind, "object": copy.deepcopy(change.new)} if kind else None

    def _error(self, status: int, reason: str, message: str) -> web.Response:
        return web.json_response(status_object(status, reason, message), status=status)

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        watch = query.get("watch", "").lower() in ("true", "1")
        self.requests.append({"watch": watch, "query": query, "auth": request.headers.get("Authorization", "")})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "Unauthorized", "Unauthorized")
        if self.fail_status:
            return self._error(self.fail_status, "ServiceUnavailable", "the fake is failing on purpose")
        ns, selector = request.match_info["ns"], query.get("labelSelector", "")
        if not watch:
            items = [copy.deepcopy(p) for p in self.pods.values()
                     if p["metadata"]["namespace"] == ns
                     and _selector_matches(p["metadata"].get("labels") or {}, selector)]
            return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        return await self._watch(request, ns, selector, query)

    async def _watch(self, request: web.Request, ns: str, selector: str, query: dict[str, str]
                     ) -> web.StreamResponse:
        watcher = Watcher(ns, selector, query.get("allowWatchBookmarks", "").lower() == "true")
        version = query.get("resourceVersion", "")
        if version and version != "0":
            if not version.isdigit():
                return self._error(400, "BadRequest", f"invalid resource version {version!r}")
            if int(version) < self.compacted:
                message = f"too old resource version: {version} ({self.rv})"
                if self.gone_mode == "http":
                    return self._error(410, "Expired", message)
                watcher.queue.put_nowait({"type": "ERROR", "object": status_object(410, "Expired", message)})
                watcher.queue.put_nowait(_END)
            else:
                for change in self.history:
                    event = self._event_for(watcher, change) if change.rv > int(version) else None
                    if event:
                        watcher.queue.put_nowait(event)
        else:  # no version: the current state as ADDED events, then changes
            for pod in self.pods.values():
                if self._matches(watcher, pod):
                    watcher.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(pod)})
        timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.watchers.append(watcher)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if item == _END:
                    break
                if item == _ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await resp.write(json.dumps(item).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
        finally:
            self.watchers.remove(watcher)
        return resp


    # -- coordination.k8s.io/v1 leases ----------------------------------------------------------------
    # As the API server: optimistic concurrency on metadata.resourceVersion (a stale PUT is 409
    # Conflict, a PUT without one is unconditional), 404 for a missing Lease (no create on update),
    # 409 AlreadyExists on a second POST, 201 on create, MicroTime and spec validation (400/422).

    def lease(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The stored Lease (a copy), or None."""
        found = self.leases.get((namespace or self.namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def put_lease(self, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Write a Lease directly (as another client would): a new version, returned."""
        ns = namespace or self.namespace
        old = self.leases.get((ns, name))
        meta = copy.deepcopy(old["metadata"]) if old else {
            "name": name, "namespace": ns, "uid": str(uuid.uuid4()),
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.leases[(ns, name)] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                                   "spec": copy.deepcopy(spec)}
        return copy.deepcopy(self.leases[(ns, name)])

    def _lease_status(self, code: int, reason: str, message: str, name: str = "") -> web.Response:
        body = status_object(code, reason, message)
        if name:
            body["details"] = {"name": name, "group": "coordination.k8s.io", "kind": "leases"}
        return web.json_response(body, status=code)

    async def _lease_gate(self, request: web.Request) -> web.Response | dict[str, Any] | None:
        """Auth, failure injection and the body of a write; a response ends the request."""
        name = request.match_info.get("name", "")
        self.lease_requests.append({"method": request.method, "name": name,
                                    "auth": request.headers.get("Authorization", "")})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "Unauthorized", "Unauthorized")
        if self.fail_status or self.lease_fail_status:
            return self._error(self.fail_status or self.lease_fail_status, "ServiceUnavailable",
                               "the fake is failing on purpose")
        if request.method not in ("POST", "PUT"):
            return None
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return self._error(400, "BadRequest", f"invalid JSON: {exc}")
        if not isinstance(body, dict) or body.get("kind") != "Lease" or not isinstance(body.get("metadata"), dict):
            return self._error(400, "BadRequest", "the body is not a coordination.k8s.io/v1 Lease")
        meta, spec = body["metadata"], body.get("spec") or {}
        if meta.get("namespace", request.match_info["ns"]) != request.match_info["ns"]:
            return self._error(400, "BadRequest",
                               "the namespace of the provided object does not match the namespace sent on the request")
        for key in ("acquireTime", "renewTime"):
            if spec.get(key) is not None and not MICRO_TIME.match(str(spec[key])):
                return self._error(400, "BadRequest", f'Lease in version "v1" cannot be handled as a Lease: '
                                                      f"parsing time {spec[key]!r} as RFC3339Micro")
        problems = []
        if spec.get("leaseDurationSeconds") is not None and not (
                isinstance(spec["leaseDurationSeconds"], int) and spec["leaseDurationSeconds"] > 0):
            problems.append("spec.leaseDurationSeconds: Invalid value: must be greater than 0")
        if spec.get("leaseTransitions") is not None and not (
                isinstance(spec["leaseTransitions"], int) and spec["leaseTransitions"] >= 0):
            problems.append("spec.leaseTransitions: Invalid value: must be greater than or equal to 0")
        if problems:
            return self._lease_status(422, "Invalid", f'Lease.coordination.k8s.io "{meta.get("name", "")}" is '
                                                      f"invalid: {', '.join(problems)}", str(meta.get("name", "")))
        return body

    async def _leases(self, request: web.Request) -> web.Response:
        """``GET`` (LeaseList) and ``POST`` (create) on the collection."""
        gate = await self._lease_gate(request)
        if isinstance(gate, web.Response):
            return gate
        ns = request.match_info["ns"]
        if request.method == "GET":
            items = [copy.deepcopy(v) for (n, _), v in sorted(self.leases.items()) if n == ns]
            return web.json_response({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        if request.method != "POST" or gate is None:
            return self._error(405, "MethodNotAllowed", f"{request.method} is not supported here")
        name = str(gate["metadata"].get("name") or "")
        if not name:
            return self._lease_status(422, "Invalid", "Lease.coordination.k8s.io is invalid: metadata.name: "
                                                      "Required value: name or generateName is required")
        if gate["metadata"].get("resourceVersion"):
            return self._error(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if (ns, name) in self.leases:
            return self._lease_status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists',
                                      name)
        created = self.put_lease(name, gate.get("spec") or {}, ns)
        self.leases[(ns, name)]["metadata"].update(
            {k: v for k, v in gate["metadata"].items() if k in ("labels", "annotations")})
        created["metadata"].update(self.leases[(ns, name)]["metadata"])
        return web.json_response(created, status=201)

    async def _lease(self, request: web.Request) -> web.Response:
        """``GET`` and ``PUT`` (replace) on one Lease."""
        gate = await self._lease_gate(request)
        if isinstance(gate, web.Response):
            return gate
        ns, name = request.match_info["ns"], request.match_info["name"]
        stored = self.leases.get((ns, name))
        if request.method not in ("GET", "PUT"):
            return self._error(405, "MethodNotAllowed", f"{request.method} is not supported here")
        if stored is None:
            return self._lease_status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', name)
        if request.method == "GET":
            return web.json_response(copy.deepcopy(stored))
        assert gate is not None
        meta = gate["metadata"]
        if meta.get("name") != name:
            return self._error(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match "
                                                  f"the name on the URL ({name})")
        version = meta.get("resourceVersion")
        if version and version != stored["metadata"]["resourceVersion"]:
            return self._lease_status(
                409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the object '
                                 "has been modified; please apply your changes to the latest version and try again",
                name)
        updated = self.put_lease(name, gate.get("spec") or {}, ns)
        for key in ("labels", "annotations"):
            if key in meta:
                self.leases[(ns, name)]["metadata"][key] = copy.deepcopy(meta[key])
            else:
                self.leases[(ns, name)]["metadata"].pop(key, None)
        updated["metadata"] = copy.deepcopy(self.leases[(ns, name)]["metadata"])
        return web.json_response(updated)


class FakeKubeThread:
    """A :class:`FakeKube` on its own event loop thread; every method call is run there.

    ``kube.add_pod(...)``, ``kube.stop()`` (async methods are awaited) — for synchronous tests that
    start real processes.
    """

    def __init__(self, namespace: str = "pipeline-server") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fakekube", daemon=True)
        self._thread.start()
        self.kube = FakeKube(namespace)
        self.call(self.kube.start)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.kube, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self.call(attr, *args, **kwargs)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.kube.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
