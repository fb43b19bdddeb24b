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

Each caller waits on a future of its own, so a caller that goes away cancels
only its wait, never the run the others share.
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
        self._running: dict[K, tuple[asyncio.Task[None], list[asyncio.Future[V]]]] = {}
        self._queued: dict[K, tuple[list[asyncio.Future[V]], C]] = {}
        self.runs = 0
        """Runs started (for tests and metrics)."""

    async def get(self, key: K, context: C) -> V:
        """The result of a run of ``fetch(key, context)`` that started at or after this call."""
        waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        if key not in self._running:
            self._start(key, context, [waiter])
        elif key in self._queued:
            self._queued[key][0].append(waiter)
        else:
            self._queued[key] = ([waiter], context)
        return await waiter

    def _start(self, key: K, context: C, waiters: list[asyncio.Future[V]]) -> None:
        self.runs += 1
        task = asyncio.get_running_loop().create_task(self._run(key, context, waiters), name="coalesced-run")
        self._running[key] = (task, waiters)

    async def _run(self, key: K, context: C, waiters: list[asyncio.Future[V]]) -> None:
        try:
            result = await self._fetch(key, context)
        except asyncio.CancelledError:
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # every sharer gets the failure
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)
        finally:
            del self._running[key]
            queued = self._queued.pop(key, None)
            if queued is not None:
                self._start(key, queued[1], queued[0])

    async def close(self) -> None:
        """Cancel runs in flight and the callers queued behind them (shutdown)."""
        for waiters, _ in self._queued.values():
            for waiter in waiters:
                waiter.cancel()
        self._queued.clear()
        tasks = [task for task, _ in self._running.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
