"""Drives the pure engine in real time: a tick task that publishes each instance's new frames.

Every ``tick`` seconds (and after every API command) the engine integrates up
to now; each running instance with a metadata destination gets its destination
opened when it starts, one message per new whole frame while it runs, and its
last frames flushed before the destination is closed when it stops. Every
task started here is owned and cancelled or awaited by :meth:`Runner.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from balancer.sim.catalog import Catalog
from balancer.sim.engine import EPSILON, Engine, Instance
from balancer.sim.metadata import Scene, source_name
from balancer.sim.mqtt import MqttSink
from balancer.sim.sinks import FileSink, NullSink, Sink, SinkError

log = logging.getLogger("balancer.sim.runner")


def make_sink(request: dict[str, Any], instance_id: str) -> Sink | None:
    """The sink for a normalized request's ``destination.metadata``; ``None`` when there is none."""
    destination = request.get("destination")
    metadata = destination.get("metadata") if isinstance(destination, dict) else None
    if not isinstance(metadata, dict):
        return None
    kind = metadata.get("type")
    if kind == "mqtt":
        return MqttSink(
            str(metadata.get("host", "")), str(metadata.get("topic", "")),
            client_id=str(metadata.get("mqtt-client-id") or f"pipeline-{instance_id}"),
            timeout=float(metadata.get("timeout") or 5),
        )
    if kind == "file":
        return FileSink(str(metadata.get("path", "")), array=metadata.get("format") == "json")
    log.warning("instance %s: %s metadata destination is not simulated; frames are dropped", instance_id, kind)
    return NullSink()


@dataclass
class Output:
    """One instance's destination and how many of its frames were published."""

    instance: Instance
    sink: Sink
    scene: Scene
    published: int = 0
    ready: bool = False
    failed: bool = False
    opening: asyncio.Task[None] | None = None

    def pending(self) -> list[bytes]:
        whole = int(self.instance.frames + EPSILON)
        messages = [self.scene.message(n) for n in range(self.published, whole)]
        self.published = max(self.published, whole)
        return messages


@dataclass
class Runner:
    engine: Engine
    catalog: Catalog
    tick: float = 0.1
    outputs: dict[str, Output] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._run(), name="sim-ticker")

    async def stop(self) -> None:
        """Cancel the ticker and pending opens, then close every destination (flushing its frames)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for output in list(self.outputs.values()):
            if output.ready:
                output.sink.publish(output.pending())
        await asyncio.gather(*(o.sink.close() for o in self.outputs.values()), return_exceptions=True)
        self.outputs.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sync()
            except Exception:
                log.exception("simulation tick failed")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def sync(self) -> None:
        """Integrate to now, open destinations of newly started instances, publish new frames."""
        self.engine.advance()
        for instance in self.engine.running():
            if instance.id not in self.seen:
                self._started(instance)
        for output in list(self.outputs.values()):
            if output.failed:
                continue
            if output.ready:
                output.sink.publish(output.pending())
            if output.instance.state.stopped and (output.ready or output.opening is None):
                del self.outputs[output.instance.id]
                self._spawn(output.sink.close(), f"close-{output.instance.id}")

    def _started(self, instance: Instance) -> None:
        self.seen.add(instance.id)
        instance.launch_command = self.catalog.launch_command(instance.name, instance.version, instance.request)
        sink = make_sink(instance.request, instance.id)
        if sink is None:
            return
        tags = instance.request.get("tags")
        scene = Scene(instance.id, source_name(instance.request), tags if isinstance(tags, dict) else None,
                      self.engine.settings.source_fps)
        output = Output(instance, sink, scene)
        self.outputs[instance.id] = output
        output.opening = self._spawn(self._open(output), f"open-{instance.id}")

    async def _open(self, output: Output) -> None:
        try:
            await output.sink.open()
        except SinkError as exc:
            log.warning("instance %s: %s", output.instance.id, exc)
            output.failed = True
            self.outputs.pop(output.instance.id, None)
            self.engine.fail(output.instance.id, str(exc))
            return
        output.ready = True
        output.opening = None
        self.sync()
