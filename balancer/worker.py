"""One worker as the balancer sees it: what discovery says, what its last poll showed, what is in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from balancer.discovery.base import WorkerSpec
from balancer.instance import mac_suffix
from balancer.status import ACTIVE_STATES, StatusEntry

MIN_SAMPLE_GAP = 0.2
"""Seconds of elapsed_time between two samples below which a current-fps estimate is noise."""


@dataclass
class Instance:
    """An active (RUNNING or QUEUED) instance of this worker, with its fps over time."""

    id: str
    state: str
    avg_fps: float
    elapsed_time: float | None
    current_fps: float | None = None
    """Frames per second between the last two polls; None until two samples exist."""

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
        }


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
        self.macs.update(m for m in (mac_suffix(e.id) for e in entries) if m)
        self.total_listed = len(entries)
        lost = []
        for token, res in list(self.reservations.items()):
            if res.instance_id is None:
                continue  # the start is still on its way: its handler releases it
            if res.instance_id in seen:
                del self.reservations[token]
            elif now - res.since > pending_timeout:
                lost.append(res.instance_id)
                del self.reservations[token]
        self.polled_at, self.polled_wall, self.error = now, time.time(), None
        self.polls += 1
        return lost

    def failed(self, error: str) -> None:
        """A poll or a forwarded request could not reach the worker: no room until the next good poll."""
        self.error = error
        self.poll_failures += 1

    def to_dict(self, now: float, state: str, reason: str) -> dict[str, Any]:
        """The one description of this worker: ``/backends``, logs and tests all use it."""
        fps = [i.fps() for i in self.instances.values() if i.state == "RUNNING"]
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
