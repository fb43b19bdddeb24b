"""Kubernetes discovery: list worker pods, then watch them, and feed the pool (DESIGN §4).

The loop is ours, not kubernetes_asyncio's ``Watch`` (which retries a 410 once with the same stale
version and reconnects without backoff). We call ``list_namespaced_pod`` with
``_preload_content=False`` and read the JSON lines ourselves; every decision about pods and events
is in :mod:`balancer.discovery.pods`, so this module only does I/O, timing and bookkeeping.

One step of the loop: make an API client if there is none, list if the table must be (re)built,
then watch one stream from the last resourceVersion until it ends or fails. After a step that made
progress (a stream that delivered an event or stayed open a while) the next starts at once;
otherwise it waits the next backoff delay. While the API server is unreachable nothing is removed:
the last known workers stay in the pool, whose health polls decide whether they have room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp

from balancer.config import DiscoverySettings
from balancer.discovery.base import DiscoverySink, WorkerSpec
from balancer.discovery.pods import (
    Backoff,
    BadEvent,
    LineBuffer,
    PodTable,
    Remove,
    ResourceExpired,
    Upsert,
    WatchError,
    parse_selector,
    status_error,
)

log = logging.getLogger("balancer.discovery")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_NAMESPACE = "pipeline-server"
PROGRESS_SECONDS = 1.0
"""A watch stream open at least this long counts as progress even without events (resets backoff)."""


def resolve_namespace(configured: str, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    """The configured namespace, else the pod's own (in-cluster), else ``pipeline-server``."""
    if configured:
        return configured
    try:
        return (sa_dir / "namespace").read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


class CredentialsError(Exception):
    """No usable kubeconfig or service account (retried with backoff: a mounted file may appear)."""


async def make_api_client(kubeconfig: str, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> Any:
    """An ``ApiClient`` from, in order: ``kubeconfig`` (``$KUBECONFIG``), the in-cluster service
    account, ``~/.kube/config``. Raises :class:`CredentialsError` when none is usable."""
    try:
        return await _make_api_client(kubeconfig, sa_dir)
    except Exception as exc:
        raise CredentialsError(f"{type(exc).__name__}: {exc}") from exc


def _credentials(kubeconfig: str, sa_dir: Path) -> str:
    """The kubeconfig path to load, or ``""`` for the in-cluster service account (file checks: sync)."""
    if kubeconfig:
        return kubeconfig
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").exists():
        return ""
    default = Path("~/.kube/config").expanduser()
    if not default.exists():
        raise FileNotFoundError("not in a pod, no $KUBECONFIG, no ~/.kube/config")
    return str(default)


async def _make_api_client(kubeconfig: str, sa_dir: Path) -> Any:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    path = await asyncio.to_thread(_credentials, kubeconfig, sa_dir)
    if path:
        await config.load_kube_config(config_file=path, client_configuration=configuration,
                                      persist_config=False)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class KubernetesDiscovery:
    """Watches worker pods; see the module docstring for the loop. Implements ``Discovery``."""

    def __init__(
        self,
        settings: DiscoverySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        sa_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        parse_selector(settings.selector)  # a bad selector fails here, at start-up
        self.settings = settings
        self.namespace = resolve_namespace(settings.namespace, sa_dir)
        self._clock = clock
        self._now = now
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._sa_dir = sa_dir
        self._table = PodTable(settings)
        self.backoff = Backoff(settings.backoff_min, settings.backoff_max, self._rng)
        self._api: Any = None
        self._need_list = True
        self._progress = False
        self._synced = False
        self._connected = False
        self._lists = 0
        self._watches = 0
        self._last_error = ""
        self._last_error_at: float | None = None
        self._last_event_at: float | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    def to_dict(self) -> dict[str, Any]:
        """Watch state for ``/backends`` and the metrics: ``restarts`` counts watch requests after the
        first (stream ends, drops and failed reconnects), ``relists`` lists after the first (after a
        410 or an error that may have lost events). Times are Unix seconds."""
        return {
            "source": "kubernetes",
            "namespace": self.namespace,
            "selector": self.settings.selector,
            "synced": self._synced,
            "connected": self._connected,
            "resource_version": self._table.resource_version,
            "restarts": max(0, self._watches - 1),
            "relists": max(0, self._lists - 1),
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "last_event_at": self._last_event_at,
            "workers": len(self._table.workers),
        }

    async def run(self, sink: DiscoverySink) -> None:
        """List and watch until cancelled; never raises anything but ``CancelledError``."""
        try:
            while True:
                delay = await self._step(sink)
                if delay > 0:
                    await self._sleep(delay)
        finally:
            api, self._api = self._api, None
            if api is not None:
                await api.close()

    async def _step(self, sink: DiscoverySink) -> float:
        """One attempt: (client,) (list,) one watch stream. Returns the delay before the next."""
        self._progress = False
        listed = False
        try:
            if self._api is None:
                self._api = await make_api_client(self.settings.kubeconfig, self._sa_dir)
            if self._need_list:
                await self._list(sink)
                listed = True
            await self._watch(sink)
        except asyncio.CancelledError:
            raise
        except ResourceExpired as exc:
            log.info("pod watch: resourceVersion %s expired (%s); re-listing",
                     self._table.resource_version, exc)
            self._need_list = True
            # An old version expiring (typically after an outage) is normal: re-list at once, whatever
            # backoff the outage built up. Only a version fresh from a list expiring at once is odd.
            self._progress = self._progress or not listed
        except (WatchError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._fail(exc)
        except Exception as exc:  # a bad event, a credentials problem, a bug, a sink error
            self._fail(exc)
            self._need_list = True  # the table may no longer match the sink: rebuild both from a list
            if not isinstance(exc, BadEvent | CredentialsError):
                log.exception("pod watch: unexpected error")
        if self._progress:
            self.backoff.reset()
            return 0.0
        return self.backoff.next()

    def _fail(self, exc: BaseException) -> None:
        self._connected = False
        self._last_error = f"{type(exc).__name__}: {exc}"[:500]
        self._last_error_at = self._now()
        log.warning("pod watch in %s: %s (failure %d in a row)",
                    self.namespace, self._last_error, 1 if self._progress else self.backoff.failures + 1)

    async def _list(self, sink: DiscoverySink) -> None:
        assert self._api is not None
        resp = await _pods_response(
            self._api,
            self.namespace,
            label_selector=self.settings.selector,
            _request_timeout=aiohttp.ClientTimeout(total=self.settings.api_timeout),
        )
        try:
            body = await resp.read()
            if resp.status != 200:
                raise status_error(_json_or_none(body), resp.status)
        finally:
            resp.release()
        try:
            pod_list = json.loads(body)
        except ValueError as exc:
            raise BadEvent(f"pod list is not JSON: {exc}") from None
        specs = self._table.replace(pod_list)
        self._lists += 1
        self._connected = True
        sink.replace_workers(specs)
        self._need_list = False
        self._synced = True
        log.info("pod list in %s (%s): %d workers at resourceVersion %s: %s", self.namespace,
                 self.settings.selector, len(specs), self._table.resource_version, _describe(specs))

    async def _watch(self, sink: DiscoverySink) -> None:
        """One watch stream from the table's resourceVersion, until the server ends it."""
        assert self._api is not None
        low, high = sorted((self.settings.watch_timeout_min, self.settings.watch_timeout_max))
        timeout = self._rng.randint(low, high)
        self._watches += 1
        started = self._clock()
        resp = await _pods_response(
            self._api,
            self.namespace,
            label_selector=self.settings.selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self._table.resource_version,
            timeout_seconds=timeout,
            _request_timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.api_timeout,
                sock_connect=self.settings.api_timeout,
                # a silent stream (half-open connection, stuck API server) is dropped after watch_idle_timeout:
                # API servers send a bookmark about every minute, so silence longer than that is a fault
                sock_read=min(timeout + self.settings.api_timeout, self.settings.watch_idle_timeout),
            ),
        )
        try:
            if resp.status != 200:
                raise status_error(_json_or_none(await resp.read()), resp.status)
            self._connected = True
            lines = LineBuffer()
            try:
                async for chunk in resp.content.iter_any():
                    for line in lines.feed(chunk):
                        self._handle_line(line, sink)
            except aiohttp.ServerTimeoutError:
                raise TimeoutError(f"watch stream silent for {self.settings.watch_idle_timeout:g}s "
                                   "(no event, no bookmark); watching again") from None
        finally:
            resp.close()
            if self._clock() - started >= PROGRESS_SECONDS:
                self._progress = True

    def _handle_line(self, line: bytes, sink: DiscoverySink) -> None:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise BadEvent(f"watch line is not JSON: {exc}") from None
        changes = self._table.apply(event)  # raises on ERROR events and garbage
        self._progress = True
        self._last_event_at = self._now()
        for change in changes:
            if isinstance(change, Upsert):
                log.info("worker %s: %s", change.spec.name, _describe([change.spec]))
                sink.upsert_worker(change.spec)
            elif isinstance(change, Remove):
                log.info("worker %s removed", change.key)
                sink.remove_worker(change.key)


async def _pods_response(api: Any, namespace: str, **query: Any) -> aiohttp.ClientResponse:
    """``GET …/namespaces/{namespace}/pods`` through kubernetes_asyncio (auth, TLS, query encoding),
    answered as the raw response: we read and check it ourselves, as plain JSON."""
    from kubernetes_asyncio import client

    resp = await client.CoreV1Api(api).list_namespaced_pod(namespace, _preload_content=False, **query)
    return cast(aiohttp.ClientResponse, resp)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _describe(specs: list[WorkerSpec]) -> str:
    return ", ".join(
        f"{s.name} {s.url or '-'} {s.device or 'any'} {'routable' if s.routable else s.reason}" for s in specs
    )
