"""Polling every worker's ``GET /pipelines/status``: the pool's only view of load and fps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from balancer.metrics import Metrics
from balancer.pool import WorkerPool
from balancer.proxy import NotDelivered, Request, Upstream, UpstreamError, UpstreamTimeout
from balancer.status import parse_status_list
from balancer.worker import Worker

log = logging.getLogger("balancer.health")

STATUS_REQUEST = Request("GET", "/pipelines/status", [("Accept", "application/json")])


class HealthPoller:
    """Polls all workers at once, every ``interval`` seconds, each poll bounded by ``timeout``.

    A new worker is polled at once (``wake``), so it can take starts without
    waiting for the next round.
    """

    def __init__(
        self,
        pool: WorkerPool,
        upstream: Upstream,
        metrics: Metrics,
        interval: float,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self._wake = asyncio.Event()
        self.rounds_started = 0
        self.rounds_done = 0
        """Rounds of polls begun and finished: a replica taking over (HA) waits for a round it saw begin."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            started = self.clock()
            self._wake.clear()
            await self.poll_all()
            pause = max(0.0, self.interval - (self.clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=pause)

    async def poll_all(self) -> None:
        self.rounds_started += 1
        # a pod with no IP yet has no URL: nothing to poll, discovery already says why it has no room
        await asyncio.gather(*(self.poll(w) for w in self.pool.workers() if w.spec.url))
        self.pool.refresh_states()
        self.rounds_done += 1

    async def poll(self, worker: Worker) -> None:
        """One poll; every outcome ends in ``pool.observe`` or ``pool.failed``, never in an exception."""
        self.metrics.polls.inc()
        try:
            resp = await self.upstream.send(worker.spec.url, STATUS_REQUEST, self.timeout)
        except NotDelivered as exc:
            return self._failed(worker, "unreachable", str(exc))
        except UpstreamTimeout as exc:
            return self._failed(worker, "timeout", f"status poll: {exc}")
        except UpstreamError as exc:
            return self._failed(worker, "broken", f"status poll: {exc}")
        if resp.status != 200:
            return self._failed(worker, "status", f"status poll answered HTTP {resp.status}")
        try:
            entries = parse_status_list(resp.body)
        except ValueError as exc:
            return self._failed(worker, "invalid", str(exc))
        self.pool.observe(worker, entries)

    def _failed(self, worker: Worker, kind: str, error: str) -> None:
        self.metrics.poll_failures.labels(kind).inc()
        if worker.error != error:
            log.debug("poll of %s failed: %s", worker.name, error)
        self.pool.failed(worker, error)
