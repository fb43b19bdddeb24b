"""Which worker may take the next pipeline start (DESIGN §3). Pure: plain data in, a decision out."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from balancer.config import STRATEGIES
from balancer.worker import Worker

READY, FULL, UNHEALTHY, PENDING, NOT_READY, TERMINATING = (
    "ready", "full", "unhealthy", "pending", "not_ready", "terminating",
)
STATES = (READY, FULL, UNHEALTHY, PENDING, NOT_READY, TERMINATING)
ROUND_ROBIN, LEAST_PIPELINES, MOST_HEADROOM = STRATEGIES


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
    predictive: bool = False
    """With ``target_fps`` > 0: also refuse a start the worker's measured capacity cannot give
    more than ``target_fps`` (see :meth:`Worker.estimate`)."""


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
        if limits.predictive:
            est = worker.estimate()
            if est is not None and est.predicted_fps <= limits.target_fps:
                return Room(
                    FULL,
                    f"one more start would run at ~{est.predicted_fps:.1f} fps <= TARGET_FPS {limits.target_fps:g}"
                    f" (capacity ~{est.capacity_fps:.0f} fps shared by {est.sharing + 1})",
                )
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
    fallback: str | None = None
    """The device pool tried after the requested one was full (``DEVICE_FALLBACK``), if any."""


def headroom(worker: Worker) -> tuple[int, float]:
    """``most-headroom``'s ranking, highest first: an idle worker (a new stream gets all of it), then
    workers by the fps a new stream would get there, then unmeasured busy workers by fewest pipelines."""
    est = worker.estimate()
    if est is not None:
        return (1, est.predicted_fps)
    if worker.load == 0:
        return (2, 0.0)
    return (0, -float(worker.load))


def choose(
    workers: Sequence[Worker],
    start: int,
    limits: Limits,
    now: float,
    device: str | None = None,
    exclude: frozenset[str] = frozenset(),
    strategy: str = ROUND_ROBIN,
) -> Choice:
    """A worker with room in the device pool, or None and why each worker was passed over.

    ``round-robin``: the first with room at or after position ``start``, wrapping around.
    ``least-pipelines``: the fewest active + starting pipelines; ``most-headroom``: the best
    :func:`headroom`; both break ties in round-robin order from ``start``, so equal workers
    still take turns. ``exclude`` holds keys already tried for this request (a start that
    could not be delivered).
    """
    passed: dict[str, Room] = {}
    best: tuple[tuple[float, float], int, Worker] | None = None
    count = len(workers)
    for step in range(count):
        index = (start + step) % count
        worker = workers[index]
        if worker.key in exclude or not in_pool(worker, device):
            continue
        verdict = room(worker, limits, now)
        if not verdict.has_room:
            passed[worker.name] = verdict
            continue
        if strategy == ROUND_ROBIN:
            return Choice(worker, index, passed)
        rank = (-float(worker.load), 0.0) if strategy == LEAST_PIPELINES else headroom(worker)
        if best is None or rank > best[0]:
            best = (rank, index, worker)
    if best is None:
        return Choice(None, -1, passed)
    return Choice(best[2], best[1], passed)


# ---- what a start request asks for -----------------------------------------------------------
LIVE_SOURCE_TYPES = frozenset({"webcam", "gst"})
LIVE_URI_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtp://", "udp://", "srt://")
LIVE_MARKERS = (b"webcam", b"gst", b"rtsp", b"RTSP", b"rtmp", b"rtp:", b"udp:", b"srt:")
"""Bytes one of which a live start's body must hold: a file start is not parsed a second time."""
_ANY_LIVE_MARKER = re.compile(b"|".join(re.escape(m) for m in LIVE_MARKERS))
"""One scan of the body for all markers (it runs for every start)."""


def live_source(body: bytes) -> bool:
    """Whether a start's source is live (a camera, an RTSP stream): it then runs at its own frame
    rate however idle the worker is. Files and HTTP files run as fast as the worker allows."""
    if _ANY_LIVE_MARKER.search(body) is None:
        return False  # the common file start: no second JSON parse
    try:
        request = json.loads(body)
    except ValueError:
        return False
    source = request.get("source") if isinstance(request, dict) else None
    if not isinstance(source, dict):
        return False
    uri = source.get("uri")
    return source.get("type") in LIVE_SOURCE_TYPES or (
        isinstance(uri, str) and uri.lower().startswith(LIVE_URI_SCHEMES)
    )


def retarget_device(body: bytes, source: str, target: str) -> bytes:
    """The start body with each ``parameters.*-device`` that names ``source`` set to ``target``.

    A GPU start moved to a CPU worker by ``DEVICE_FALLBACK`` must ask for the CPU, or the worker
    accepts it and the pipeline fails. Other parameters are left as they are.
    """
    request = json.loads(body)
    params = request["parameters"]
    for key, value in params.items():
        if isinstance(key, str) and key.endswith("-device") and isinstance(value, str) and source in value.upper():
            params[key] = target
    return json.dumps(request).encode()
