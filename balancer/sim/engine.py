"""The simulated worker's core: instance state machine and capacity model, pure and synchronous.

A worker can process ``capacity_fps`` frames per second in total. The running
pipelines share it fairly (max-min): a live source (``gst``/``webcam`` or an
``rtsp://`` URI) never runs faster than its own frame rate, and what it leaves
unused goes to the others, so with only file sources each runs at
``capacity / running``. Rates change the instant the set of running pipelines
changes, so frames are integrated piecewise between events. Time comes from an
injected clock (seconds since the epoch), which makes every figure testable
without sleeping.
"""

from __future__ import annotations

import copy
import enum
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from balancer.sim.ids import InstanceIds

Clock = Callable[[], float]
EPSILON = 1e-9


class State(enum.StrEnum):
    """Instance states, as the real server names them."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"

    @property
    def stopped(self) -> bool:
        return self in (State.COMPLETED, State.ERROR, State.ABORTED)


@dataclass(frozen=True)
class SourceSpec:
    """What the capacity model needs to know about a request's source."""

    live: bool = False
    """A live source delivers frames at its own rate; a file is read as fast as the worker allows."""

    frames: int | None = None
    """Finite source: the instance goes COMPLETED after this many frames (``sim-frames``)."""

    @staticmethod
    def from_request(request: dict[str, Any]) -> SourceSpec:
        """``source.type`` gst/webcam or an ``rtsp://`` URI is live; ``source.properties.sim-frames`` ends it."""
        source = request.get("source")
        if not isinstance(source, dict):
            return SourceSpec()
        kind = source.get("type")
        uri = source.get("uri")
        live = kind in ("gst", "webcam") or (isinstance(uri, str) and uri.lower().startswith("rtsp://"))
        properties = source.get("properties")
        frames = properties.get("sim-frames") if isinstance(properties, dict) else None
        if not isinstance(frames, int) or isinstance(frames, bool) or frames <= 0:
            frames = None
        return SourceSpec(live=live, frames=frames)


@dataclass
class Instance:
    """One pipeline instance and its integrated frame count."""

    id: str
    name: str
    version: str
    request: dict[str, Any]
    source: SourceSpec
    created: float
    state: State = State.QUEUED
    frames: float = 0.0
    rate: float = 0.0
    latency: float = 0.0
    start_time: float | None = None
    stop_time: float | None = None
    message: str = ""
    launch_command: str | None = None

    def elapsed(self, now: float) -> float | None:
        if self.start_time is None:
            return None
        end = self.stop_time if self.stop_time is not None else now
        return max(0.0, end - self.start_time)

    def avg_fps(self, now: float) -> float:
        """Cumulative, like the real server: whole frames since start / seconds since start."""
        elapsed = self.elapsed(now)
        if not elapsed:
            return 0
        return int(self.frames + EPSILON) / elapsed

    def status(self, now: float) -> dict[str, Any]:
        """The real status entry (``avg_pipeline_latency`` only once a frame went through; kept when stopped)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "avg_fps": self.avg_fps(now),
            "start_time": self.start_time,
            "elapsed_time": self.elapsed(now),
            "message": self.message,
        }
        if self.frames >= 1:
            entry["avg_pipeline_latency"] = self.latency
        return entry


def latency(rate: float, capacity_fps: float) -> float:
    """A plausible per-frame latency: the time one frame takes at its share of the worker."""
    share = rate if rate > 0 else capacity_fps
    return 1.0 / share if share > 0 else 0.0


def fair_shares(capacity: float, caps: list[float | None]) -> list[float]:
    """Max-min fair split of ``capacity``; ``None`` means no cap (a file source)."""
    rates = [0.0] * len(caps)
    order = sorted(range(len(caps)), key=lambda i: (caps[i] is None, caps[i] or 0.0))
    remaining, left = capacity, len(caps)
    for i in order:
        share = remaining / left
        cap = caps[i]
        rates[i] = min(cap, share) if cap is not None else share
        remaining -= rates[i]
        left -= 1
    return rates


@dataclass
class EngineSettings:
    capacity_fps: float = 130.0
    source_fps: float = 30.0
    noise: float = 0.02
    """Each capacity-bound rate is multiplied by a factor drawn uniformly in ``1 ± noise`` per step."""
    max_running: int = 0
    """Like the real MAX_RUNNING_PIPELINES: more starts than this wait in QUEUED; <= 0 is unlimited."""


@dataclass
class Engine:
    """All instances of one worker; every public call first integrates frames up to ``clock()``."""

    clock: Clock
    ids: InstanceIds
    settings: EngineSettings = field(default_factory=EngineSettings)
    rng: random.Random = field(default_factory=random.Random)
    instances: dict[str, Instance] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._t = self.clock()

    # ---- commands -------------------------------------------------------
    def create(self, name: str, version: str, request: dict[str, Any]) -> Instance:
        """A new instance: QUEUED, and RUNNING at once when a slot is free."""
        now = self.advance()
        instance = Instance(
            id=self.ids.new(), name=name, version=version, request=copy.deepcopy(request),
            source=SourceSpec.from_request(request), created=now,
        )
        self.instances[instance.id] = instance
        self.queue.append(instance.id)
        self._promote(now)
        return instance

    def stop(self, instance_id: str) -> dict[str, Any] | None:
        """The status at this moment (a queued one is already ABORTED); the instance is ABORTED after."""
        now = self.advance()
        instance = self.instances.get(instance_id)
        if instance is None:
            return None
        if instance.state is State.QUEUED:
            self.queue.remove(instance_id)
            instance.state = State.ABORTED
            return self._status(instance, now)
        before = self._status(instance, now)
        if instance.state is State.RUNNING:
            self._finish(instance, State.ABORTED, now)
            self._promote(now)
        return before

    def fail(self, instance_id: str, message: str) -> None:
        """The instance hit an error (e.g. its MQTT broker is unreachable): ERROR, slot freed."""
        now = self.advance()
        instance = self.instances.get(instance_id)
        if instance is None or instance.state.stopped:
            return
        if instance.state is State.QUEUED:
            self.queue.remove(instance_id)
        instance.message = message
        self._finish(instance, State.ERROR, now)
        self._promote(now)

    # ---- queries --------------------------------------------------------
    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def status(self, instance_id: str) -> dict[str, Any] | None:
        now = self.advance()
        instance = self.instances.get(instance_id)
        return None if instance is None else self._status(instance, now)

    def statuses(self) -> list[dict[str, Any]]:
        """Every instance ever started, oldest first (the real list is never pruned)."""
        now = self.advance()
        return [self._status(instance, now) for instance in self.instances.values()]

    def running(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state is State.RUNNING]

    # ---- the model ------------------------------------------------------
    def advance(self) -> float:
        """Integrate frames from the last call up to now; finite sources complete on the exact frame."""
        now = max(self.clock(), self._t)
        self._set_rates(noisy=True)
        while self._t < now:
            running = self.running()
            span = now - self._t
            finishing = [
                ((i.source.frames - i.frames) / i.rate, i)
                for i in running if i.source.frames is not None and i.rate > 0
            ]
            step = max(0.0, min([span, *(t for t, _ in finishing)]))
            for instance in running:
                instance.frames += instance.rate * step
            self._t += step
            done = [i for t, i in finishing if t <= step + EPSILON]
            if not done:
                break
            for instance in done:
                instance.frames = float(instance.source.frames or 0)
                self._finish(instance, State.COMPLETED, self._t)
            self._promote(self._t)
        self._t = now
        return now

    def _status(self, instance: Instance, now: float) -> dict[str, Any]:
        return instance.status(now)

    def _finish(self, instance: Instance, state: State, when: float) -> None:
        instance.state = state
        instance.stop_time = when if instance.start_time is not None else None
        instance.rate = 0.0
        self._set_rates(noisy=False)

    def _promote(self, when: float) -> None:
        """Start queued instances while there is a free slot (FIFO, like the real pipeline queue)."""
        limit = self.settings.max_running
        started = False
        while self.queue and (limit <= 0 or len(self.running()) < limit):
            instance = self.instances[self.queue.popleft()]
            instance.state = State.RUNNING
            instance.start_time = when
            started = True
        if started:
            self._set_rates(noisy=False)

    def _set_rates(self, noisy: bool) -> None:
        running = self.running()
        caps: list[float | None] = [self.settings.source_fps if i.source.live else None for i in running]
        shares = fair_shares(self.settings.capacity_fps, caps)
        noise = self.settings.noise
        for instance, cap, share in zip(running, caps, shares, strict=True):
            if cap is not None and share >= cap - EPSILON:
                instance.rate = cap  # a live source that the worker keeps up with: exactly its own rate
            else:
                factor = self.rng.uniform(1 - noise, 1 + noise) if noisy and noise > 0 else 1.0
                instance.rate = share * factor if cap is None else min(share * factor, cap)
            instance.latency = latency(instance.rate, self.settings.capacity_fps)


def availability(statuses: Iterable[dict[str, Any]], max_running: int, target_fps: float) -> str:
    """The seed's HAProxy agent rule: ``0%`` when full or slow, else ``100%``.

    Walks the RUNNING entries (QUEUED ones do not count): ``0%`` once their count
    reaches ``max_running`` (> 0) or one reports ``avg_fps`` <= ``target_fps`` (> 0).
    """
    count = 0
    for entry in statuses:
        if entry.get("state") != State.RUNNING:
            continue
        count += 1
        if max_running > 0 and count >= max_running:
            return "0%"
        if target_fps > 0 and float(entry.get("avg_fps") or 0) <= target_fps:
            return "0%"
    return "100%"
