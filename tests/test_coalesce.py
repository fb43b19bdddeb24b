"""Coalescer: concurrent callers share runs, but never one that started before they asked."""

from __future__ import annotations

import asyncio

import pytest

from balancer.coalesce import Coalescer


class Source:
    """A fetch whose runs the test finishes by hand; each result names the run and the state it read."""

    def __init__(self) -> None:
        self.state = 0
        self.runs: list[asyncio.Future[None]] = []
        self.contexts: list[str] = []

    async def fetch(self, key: str, context: str) -> tuple[str, int, int]:
        seen = self.state  # what the run reads, at its start
        self.contexts.append(context)
        gate = asyncio.get_running_loop().create_future()
        self.runs.append(gate)
        await gate
        return key, len(self.runs), seen


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_callers_share_the_run_that_starts_after_them() -> None:
    source = Source()
    co: Coalescer[str, str, tuple[str, int, int]] = Coalescer(source.fetch)
    first = asyncio.create_task(co.get("k", "a"))
    await settle()
    source.state = 1  # a write the later callers must see
    later = [asyncio.create_task(co.get("k", c)) for c in ("b", "c", "d")]
    await settle()
    assert len(source.runs) == 1  # the later ones wait: the run in flight began before them
    source.runs[0].set_result(None)
    await settle()
    assert await first == ("k", 1, 0)
    assert len(source.runs) == 2  # one more run for all three
    source.runs[1].set_result(None)
    assert [await t for t in later] == [("k", 2, 1)] * 3
    assert source.contexts == ["a", "b"]  # the queued run carries its first caller's context
    assert co.runs == 2


async def test_keys_do_not_share() -> None:
    source = Source()
    co: Coalescer[str, str, tuple[str, int, int]] = Coalescer(source.fetch)
    a, b = asyncio.create_task(co.get("a", "x")), asyncio.create_task(co.get("b", "x"))
    await settle()
    assert len(source.runs) == 2
    for run in source.runs:
        run.set_result(None)
    assert {(await a)[0], (await b)[0]} == {"a", "b"}


async def test_failure_reaches_every_sharer_and_the_next_run_is_fresh() -> None:
    source = Source()
    co: Coalescer[str, str, tuple[str, int, int]] = Coalescer(source.fetch)
    first = asyncio.create_task(co.get("k", "a"))
    await settle()
    queued = [asyncio.create_task(co.get("k", "b")) for _ in range(2)]
    await settle()
    source.runs[0].set_exception(RuntimeError("worker gone"))
    await settle()
    source.runs[1].set_exception(ValueError("still gone"))
    with pytest.raises(RuntimeError):
        await first
    for task in queued:
        with pytest.raises(ValueError):
            await task
    again = asyncio.create_task(co.get("k", "c"))
    await settle()
    source.runs[2].set_result(None)
    assert (await again)[1] == 3


async def test_a_cancelled_caller_does_not_cancel_the_shared_run() -> None:
    source = Source()
    co: Coalescer[str, str, tuple[str, int, int]] = Coalescer(source.fetch)
    first = asyncio.create_task(co.get("k", "a"))
    await settle()
    waiting = [asyncio.create_task(co.get("k", "b")) for _ in range(2)]
    await settle()
    first.cancel()
    waiting[0].cancel()
    await settle()
    source.runs[0].set_result(None)
    await settle()
    source.runs[1].set_result(None)
    assert await waiting[1] == ("k", 2, 0)


async def test_close_cancels_runs_and_waiters() -> None:
    source = Source()
    co: Coalescer[str, str, tuple[str, int, int]] = Coalescer(source.fetch)
    first = asyncio.create_task(co.get("k", "a"))
    await settle()
    queued = asyncio.create_task(co.get("k", "b"))
    await settle()
    await asyncio.wait_for(co.close(), 5)
    for task in (first, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(source.runs) == 1
