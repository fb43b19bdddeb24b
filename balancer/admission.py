"""Which worker may take the next pipeline start (DESIGN §3). Pure: plain data in, a decision out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from balancer.worker import Worker

READY, FULL, UNHEALTHY, PENDING, NOT_READY, TERMINATING = (
    "ready", "full", "unhealthy", "pending", "not_ready", "terminating",
)
STATES = (READY, FULL, UNHEALTHY, PENDING, NOT_READY, TERMINATING)


@dataclass(frozen=True)
class Limits:
    """The admission rules' parameters (from ``AdmissionSettings`` and ``HealthSettings``)."""

    max_running: int = 0
    """<= 0: no limit on active pipelines per worker."""
    target_fps: float = 0.0
    """<= 0: fps does not limit admission."""
    warmup: float = 5.0
    """Seconds of elapsed time before an instance's fps counts."""
    stale_after: float = 3.0
    """Seconds after which a worker's last good poll no longer describes it."""


@dataclass(frozen=True)
class Room:
    """A worker's state for admission and the reason when it is not ``ready``."""

    state: str
    reason: str = ""

    @property
    def has_room(self) -> bool:
        return self.state == READY


def room(worker: Worker, limits: Limits, now: float) -> Room:
    """Whether ``worker`` can take one more start now, and if not, why."""
    spec = worker.spec
    if spec.terminating:
        return Room(TERMINATING, spec.reason or "pod is terminating")
    if not spec.routable:
        return Room(NOT_READY, spec.reason or "not ready")
    if worker.error is not None:
        return Room(UNHEALTHY, worker.error)
    if worker.polled_at is None:
        return Room(PENDING, "not polled yet")
    age = now - worker.polled_at
    if age > limits.stale_after:
        return Room(UNHEALTHY, f"last good poll {age:.1f}s ago")
    if limits.max_running > 0 and worker.load >= limits.max_running:
        return Room(
            FULL,
            f"{worker.active} active + {worker.reserved} starting >= MAX_RUNNING_PIPELINES {limits.max_running}",
        )
    if limits.target_fps > 0:
        for inst in worker.instances.values():
            warmed = inst.elapsed_time is not None and inst.elapsed_time >= limits.warmup
            if inst.state == "RUNNING" and warmed and inst.fps() <= limits.target_fps:
                return Room(FULL, f"instance {inst.id} at {inst.fps():.1f} fps <= TARGET_FPS {limits.target_fps:g}")
    return Room(READY)


def in_pool(worker: Worker, device: str | None) -> bool:
    """A start that asks for a device goes to workers of that device, or of unknown device."""
    return device is None or worker.spec.device is None or worker.spec.device == device


@dataclass
class Choice:
    """The outcome of :func:`choose`: a worker (or None) and why each other worker was passed over."""

    worker: Worker | None
    index: int = -1
    """Position of the chosen worker in the list given to :func:`choose`."""
    passed: dict[str, Room] = field(default_factory=dict)


def choose(
    workers: Sequence[Worker],
    start: int,
    limits: Limits,
    now: float,
    device: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Choice:
    """Round-robin: the first worker with room at or after position ``start``, wrapping around.

    ``exclude`` holds keys already tried for this request (a start that could not be delivered).
    """
    passed: dict[str, Room] = {}
    count = len(workers)
    for step in range(count):
        index = (start + step) % count
        worker = workers[index]
        if worker.key in exclude or not in_pool(worker, device):
            continue
        verdict = room(worker, limits, now)
        if verdict.has_room:
            return Choice(worker, index, passed)
        passed[worker.name] = verdict
    return Choice(None, -1, passed)
