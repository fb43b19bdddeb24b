"""A fixed list of worker URLs: for local use, the demo and tests."""

from __future__ import annotations

import asyncio
from typing import Any

from balancer.discovery.base import DiscoverySink, WorkerSpec


def spec_from_url(url: str, device: str | None = None) -> WorkerSpec:
    """A static worker is keyed and named by its URL; ``url#GPU`` sets its device pool."""
    base, _, fragment = url.partition("#")
    base = base.rstrip("/")
    dev = fragment.upper() or device
    return WorkerSpec(key=base, name=base, url=base, device=dev or None)


class StaticDiscovery:
    """Delivers its list once, then waits to be cancelled."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        self._specs = [spec_from_url(u) for u in urls]
        self._synced = False

    @property
    def synced(self) -> bool:
        return self._synced

    async def run(self, sink: DiscoverySink) -> None:
        sink.replace_workers(list(self._specs))
        self._synced = True
        await asyncio.Event().wait()

    def to_dict(self) -> dict[str, Any]:
        return {"source": "static", "synced": self._synced, "workers": len(self._specs)}
