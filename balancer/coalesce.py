"""Sharing one run of an expensive read among the callers that asked for it at about the same time.

Used for the merged ``GET /pipelines/status``: each run asks every worker, so
under load the balancer would send N requests per client request. Callers
share a run only if it *starts after they asked*: a caller that arrives while a
run is in flight waits for the next run, which starts when that one ends and
serves everyone who queued meanwhile. So an answer is never older than the
caller's own request (a client that has just started a pipeline always sees
it), while at most one run per key is in flight and one more is queued,
however many callers there are. A run gets the ``context`` of the caller that
started or first queued it (e.g. the headers to pass on).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")
V = TypeVar("V")


class Coalescer(Generic[K, C, V]):
    def __init__(self, fetch: Callable[[K, C], Awaitable[V]]) -> None:
        self._fetch = fetch
        self._running: dict[K, asyncio.Task[V]] = {}
        self._queued: dict[K, tuple[asyncio.Future[V], C]] = {}
        self.runs = 0
        """Runs started (for tests and metrics)."""

    async def get(self, key: K, context: C) -> V:
        """The result of a run of ``fetch(key, context)`` that started at or after this call."""
        if key not in self._running:
            return await asyncio.shield(self._start(key, context))
        queued = self._queued.get(key)
        if queued is None:
            queued = self._queued[key] = (asyncio.get_running_loop().create_future(), context)
        return await asyncio.shield(queued[0])

    def _start(self, key: K, context: C) -> asyncio.Task[V]:
        self.runs += 1
        task = asyncio.get_running_loop().create_task(self._run(key, context), name="coalesced-run")
        self._running[key] = task
        return task

    async def _run(self, key: K, context: C) -> V:
        try:
            return await self._fetch(key, context)
        finally:
            del self._running[key]
            queued = self._queued.pop(key, None)
            if queued is not None:
                self._chain(self._start(key, queued[1]), queued[0])

    @staticmethod
    def _chain(task: asyncio.Task[V], into: asyncio.Future[V]) -> None:
        def done(t: asyncio.Task[V]) -> None:
            if into.done():
                return
            if t.cancelled():
                into.cancel()
            elif t.exception() is not None:
                into.set_exception(t.exception())  # type: ignore[arg-type]
            else:
                into.set_result(t.result())

        task.add_done_callback(done)

    async def close(self) -> None:
        """Cancel runs in flight and wake their waiters (shutdown)."""
        for queued, _ in self._queued.values():
            queued.cancel()
        self._queued.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
