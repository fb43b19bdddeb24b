"""The seed's HAProxy availability agent (xinetd on port 3333), served in-process.

Each connection gets ``100%`` or ``0%`` plus a newline, then is closed. The
answer follows the seed's rule (:func:`balancer.sim.engine.availability`) on
this worker's own status list; any error answers ``100%``, as the seed's
script did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from balancer.sim.engine import Engine, availability

log = logging.getLogger("balancer.sim.agent")


class Agent:
    def __init__(self, engine: Engine, max_running: int, target_fps: float) -> None:
        self.engine = engine
        self.max_running = max_running
        self.target_fps = target_fps
        self._server: asyncio.Server | None = None

    def answer(self) -> str:
        try:
            return availability(self.engine.statuses(), self.max_running, self.target_fps)
        except Exception:
            log.exception("agent check failed; answering 100%")
            return "100%"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"{self.answer()}\n".encode())
            await asyncio.wait_for(writer.drain(), 5)
            if writer.can_write_eof():
                writer.write_eof()
            # Drain what the client sent (HAProxy's "ping"): closing with unread input would
            # send a reset, which can destroy the answer before the client reads it.
            await asyncio.wait_for(reader.read(4096), 1)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        log.info("availability agent on %s:%d", host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
