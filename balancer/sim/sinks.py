"""Metadata destinations: where an instance's per-frame messages go.

``mqtt`` publishes one message per frame to a broker (like ``gvametapublish
method=mqtt``), ``file`` writes JSON lines to a path; anything else is
accepted and dropped (the MQTT sink is in :mod:`balancer.sim.mqtt`, the choice in
:mod:`balancer.sim.runner`). ``open`` raises :class:`SinkError` with the message the
instance's ERROR status then shows; ``publish`` never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import IO, Protocol

log = logging.getLogger("balancer.sim.sinks")


class SinkError(Exception):
    """The destination cannot be used: the instance goes to ERROR with this message."""


class Sink(Protocol):
    async def open(self) -> None: ...

    def publish(self, payloads: list[bytes]) -> None: ...

    async def close(self) -> None: ...


class NullSink:
    """No metadata destination (or one the simulator does not implement, e.g. kafka)."""

    async def open(self) -> None:
        return None

    def publish(self, payloads: list[bytes]) -> None:
        return None

    async def close(self) -> None:
        return None


class FileSink:
    """``{"type": "file", "path": ..., "format": "json-lines"|"json"}``: one JSON document per frame."""

    def __init__(self, path: str, array: bool = False) -> None:
        self.path = path
        self.array = array
        self._file: IO[bytes] | None = None
        self._count = 0

    async def open(self) -> None:
        try:
            self._file = await asyncio.to_thread(open, self.path, "wb")
        except OSError as exc:
            raise SinkError(f"Error on Pipeline: gvametapublish: failed to open file {self.path}: "
                            f"{exc.strerror or exc}") from exc
        if self.array:
            self._file.write(b"[")

    def publish(self, payloads: list[bytes]) -> None:
        # Page-cache writes of a few KiB per tick: cheaper than a thread hop.
        if self._file is None or not payloads:
            return
        if self.array:
            joined = b",\n".join(payloads)
            self._file.write((b",\n" if self._count else b"\n") + joined)
        else:
            self._file.write(b"\n".join(payloads) + b"\n")
        self._count += len(payloads)

    async def close(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        if self.array:
            file.write(b"\n]\n")
        await asyncio.to_thread(file.close)
