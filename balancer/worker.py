"""One worker as the balancer sees it: what discovery says, what its last poll showed, what is in flight."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from balancer.discovery.base import WorkerSpec
from balancer.instance import mac_suffix
from balancer.status import ACTIVE_STATES, StatusEntry

MIN_SAMPLE_GAP = 0.2
"""Seconds of elapsed_time between two samples below which a current-fps estimate is noise."""

CAPACITY_WINDOW = 10.0
"""Seconds of polls one capacity measurement spans at most: long enough to average out rate noise
and whole-frame rounding, short enough to follow a worker whose capacity changes."""

CAPACITY_MIN_WINDOW = 0.5
"""Seconds a capacity measurement spans at least (whole-frame counts make shorter ones coarse)."""


@dataclass
class Instance:
    """An active (RUNNING or QUEUED) instance of this worker, with its fps over time."""

    id: str
    state: str
    avg_fps: float
    elapsed_time: float | None
    current_fps: float | None = None
    """Frames per second between the last two polls; None until two samples exist."""
    live: bool = False
    """Started through this balancer with a live source (camera, RTSP): it runs at its own frame
    rate, so its fps says nothing about the worker's capacity."""

    def fps(self) -> float:
        """The best rate we have: current once two samples exist, else the cumulative average."""
        return self.avg_fps if self.current_fps is None else self.current_fps

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "avg_fps": round(self.avg_fps, 2),
            "current_fps": None if self.current_fps is None else round(self.current_fps, 2),
            "elapsed_time": self.elapsed_time,
            "live": self.live,
        }


@dataclass(frozen=True)
class Capacity:
    """Frames per second a saturated worker delivered in total over a window of polls."""

    fps: float
    """All its instances' frames in the window, divided by the window's length."""
    streams: int
    """RUNNING streams at the end of the window."""
    at: float
    """Clock time of the measurement."""
    window: float
    """Seconds the measurement spans."""


@dataclass(frozen=True)
class Estimate:
    """Predictive admission's figures for one worker (DESIGN §3)."""

    capacity_fps: float
    predicted_fps: float
    """The rate each capacity-bound stream would get with one more start: (capacity - live) / (sharing + 1)."""
    sharing: int
    """Streams that share the capacity now: running non-live, queued, and starts in flight."""


@dataclass(frozen=True)
class _Sample:
    """One good poll's RUNNING streams: id -> (frames so far, elapsed seconds)."""

    at: float
    streams: dict[str, tuple[float, float]]


def _frames(entry: StatusEntry) -> float:
    """Frames an instance has processed (0 while QUEUED)."""
    return entry.frames or 0.0


@dataclass
class Reservation:
    """A start counted against this worker before its status list shows it.

    Taken when the worker is picked, given an instance id when the worker answers
    the start, dropped when the status list shows that id (it is then counted as
    active) or when the start fails.
    """

    token: int
    since: float
    instance_id: str | None = None


def _next_sample(old: Instance | None, entry: StatusEntry) -> Instance:
    current = None
    if old is not None:
        current = old.current_fps
        if entry.elapsed_time is not None and old.elapsed_time is not None:
            gap = entry.elapsed_time - old.elapsed_time
            old_frames = old.avg_fps * old.elapsed_time
            if gap >= MIN_SAMPLE_GAP and entry.frames is not None:
                current = max(0.0, (entry.frames - old_frames) / gap)
    return Instance(entry.id, entry.state, entry.avg_fps, entry.elapsed_time, current)


@dataclass
class Worker:
    spec: WorkerSpec
    instances: dict[str, Instance] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    macs: set[str] = field(default_factory=set)
    """MAC suffixes of the ids this worker has listed (one, on a real worker)."""
    polled_at: float | None = None
    """Clock time of the last good poll."""
    polled_wall: float | None = None
    """Wall time of the last good poll, for people."""
    error: str | None = None
    """Why the last poll (or a forwarded request) failed; None after a good poll."""
    polls: int = 0
    poll_failures: int = 0
    total_listed: int = 0
    live: set[str] = field(default_factory=set)
    """Ids of starts this balancer sent with a live source (see :class:`Instance`)."""
    capacity: Capacity | None = None
    """The last capacity measurement; kept across changes of the stream set (the worker's capacity
    does not change when a stream starts, but a window spanning the change would mis-measure it)."""
    _samples: deque[_Sample] = field(default_factory=deque, repr=False)
    """The RUNNING streams of the polls of the last ``CAPACITY_WINDOW`` seconds."""

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def active(self) -> int:
        return len(self.instances)

    @property
    def reserved(self) -> int:
        return len(self.reservations)

    @property
    def load(self) -> int:
        """Active instances plus starts not yet seen: what admission counts against the limit."""
        return self.active + self.reserved

    def observe(self, entries: list[StatusEntry], now: float, pending_timeout: float) -> list[str]:
        """Take in a good poll. Returns the reservations' ids that were dropped as lost."""
        seen = {e.id for e in entries}
        self.instances = {
            e.id: _next_sample(self.instances.get(e.id), e) for e in entries if e.state in ACTIVE_STATES
        }
        for instance in self.instances.values():
            instance.live = instance.id in self.live
        self._measure(entries, now)
        self.macs.update(m for m in (mac_suffix(e.id) for e in entries) if m)
        self.total_listed = len(entries)
        lost = self.settle_reservations(seen, now, pending_timeout)
        self.live &= self.instances.keys() | self.pending_ids()
        self.polled_at, self.polled_wall, self.error = now, time.time(), None
        self.polls += 1
        return lost

    def settle_reservations(self, seen: set[str], now: float, pending_timeout: float) -> list[str]:
        """Drop the reservations of accepted starts now listed (``seen``: they count as active) or lost
        (unlisted for ``pending_timeout``, e.g. the worker died right after accepting). Returns the lost ids.

        Starts still on their way (no id yet) are left to their handler, which releases them.
        """
        lost = []
        for token, res in list(self.reservations.items()):
            if res.instance_id is None:
                continue
            if res.instance_id in seen:
                del self.reservations[token]
            elif now - res.since > pending_timeout:
                lost.append(res.instance_id)
                del self.reservations[token]
        return lost

    def pending_ids(self) -> set[str]:
        """Ids of accepted starts the status list has not shown yet."""
        return {r.instance_id for r in self.reservations.values() if r.instance_id is not None}

    def _measure(self, entries: list[StatusEntry], now: float) -> None:
        """Measure the worker's capacity: every frame its instances made over the last polls, per second.

        Counting every frame, not each stream's rate, keeps the figure right while streams start and
        stop in the window: a saturated worker's total does not change when its streams' shares do.
        Saturated means a file (non-live) stream ran through the whole window, and was past its start
        (had made a frame) when the window began: a pipeline still loading its model shows nothing
        of the worker's capacity. Streams that start and end inside the window are missed (the figure
        can only be low). The reference stream's own elapsed time gives the window's length on the
        worker's clock.
        """
        running = {
            e.id: (_frames(e), e.elapsed_time)
            for e in entries if e.state == "RUNNING" and e.elapsed_time is not None
        }
        self._samples.append(_Sample(now, running))
        while len(self._samples) > 2 and self._samples[1].at <= now - CAPACITY_WINDOW:
            self._samples.popleft()
        last = self._samples[-1]
        for base in list(self._samples)[:-1]:
            flowing = [i for i, (f, _) in base.streams.items() if f >= 1 and i in last.streams and i not in self.live]
            if flowing:
                break
        else:
            return
        window = max(last.streams[i][1] - base.streams[i][1] for i in flowing)
        if window < CAPACITY_MIN_WINDOW:
            return
        now_frames = {e.id: _frames(e) for e in entries}
        made = sum(now_frames.get(i, f) - f for i, (f, _) in base.streams.items())
        made += sum(now_frames[i] for i in running if i not in base.streams)
        self.capacity = Capacity(max(0.0, made) / window, len(running), now, window)

    def estimate(self) -> Estimate | None:
        """Capacity and the fps one more start would leave each stream, or None when unknown.

        Unknown: never measured, or no warmed-up non-live stream (one that has made frames) runs
        now: an idle worker, or one with only live streams, gives no sign of where its limit is.
        The next start, the queued instances and the starts in flight are assumed to take a full
        share each (as file sources do).
        """
        if self.capacity is None:
            return None
        running = [i for i in self.instances.values() if i.state == "RUNNING"]
        if not any(not i.live and i.avg_fps > 0 for i in running):
            return None
        live_fps = sum(i.fps() for i in running if i.live)
        sharing = sum(1 for i in running if not i.live) + (self.active - len(running)) + self.reserved
        predicted = max(0.0, self.capacity.fps - live_fps) / (sharing + 1)
        return Estimate(self.capacity.fps, predicted, sharing)

    def failed(self, error: str) -> None:
        """A poll or a forwarded request could not reach the worker: no room until the next good poll."""
        self.error = error
        self.poll_failures += 1

    def to_dict(self, now: float, state: str, reason: str, estimate: Estimate | None = None) -> dict[str, Any]:
        """The one description of this worker: ``/backends``, logs and tests all use it.

        ``estimate`` is :meth:`estimate`, when the caller wants the prediction shown.
        """
        fps = [i.fps() for i in self.instances.values() if i.state == "RUNNING"]
        capacity = self.capacity
        return {
            "name": self.name,
            "key": self.key,
            "url": self.spec.url,
            "node": self.spec.node,
            "device": self.spec.device,
            "state": state,
            "reason": reason,
            "active": self.active,
            "reserved": self.reserved,
            "running": len(fps),
            "queued": sum(1 for i in self.instances.values() if i.state == "QUEUED"),
            "fps": {
                "min": round(min(fps), 2) if fps else None,
                "total": round(sum(fps), 2),
                "instances": {i.id: round(i.fps(), 2) for i in self.instances.values()},
            },
            "capacity_fps": None if capacity is None else round(capacity.fps, 2),
            "capacity_streams": None if capacity is None else capacity.streams,
            "capacity_age": None if capacity is None else round(now - capacity.at, 3),
            "predicted_fps": None if estimate is None else round(estimate.predicted_fps, 2),
            "instances": [i.to_dict() for i in self.instances.values()],
            "instances_listed": self.total_listed,
            "macs": sorted(self.macs),
            "last_poll": self.polled_wall,
            "last_poll_age": None if self.polled_at is None else round(now - self.polled_at, 3),
            "error": self.error,
            "polls": self.polls,
            "poll_failures": self.poll_failures,
            "routable": self.spec.routable,
            "terminating": self.spec.terminating,
            "labels": dict(self.spec.labels),
        }
