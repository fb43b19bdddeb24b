"""Workers' status lists: read them strictly, merge them for ``GET /pipelines/status``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STATES = frozenset({"QUEUED", "RUNNING", "COMPLETED", "ERROR", "ABORTED"})
ACTIVE_STATES = frozenset({"QUEUED", "RUNNING"})
"""States that hold a worker's slot: the real worker queues starts beyond its own limit."""


@dataclass(frozen=True)
class StatusEntry:
    """One instance as its worker reports it."""

    id: str
    state: str
    avg_fps: float
    elapsed_time: float | None

    @property
    def frames(self) -> float | None:
        """Frames processed since start: ``avg_fps`` is cumulative, so fps * elapsed."""
        return None if self.elapsed_time is None else self.avg_fps * self.elapsed_time


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} is not a number: {value!r}"[:200])
    return float(value)


def parse_status_list(body: bytes) -> list[StatusEntry]:
    """A worker's ``GET /pipelines/status`` body, or ValueError saying what is wrong with it.

    A worker that answers garbage must be seen as unhealthy, not as idle.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ValueError(f"status list is not JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, list):
        raise ValueError(f"status list is a {type(payload).__name__}, not a list")
    entries = []
    for raw in payload:
        if not isinstance(raw, dict):
            raise ValueError(f"status entry is a {type(raw).__name__}, not an object")
        instance_id, state = raw.get("id"), raw.get("state")
        if not isinstance(instance_id, str) or not instance_id:
            raise ValueError(f"status entry without a string id: {raw!r}"[:200])
        if state not in STATES:
            raise ValueError(f"status entry {instance_id} has unknown state {state!r}"[:200])
        fps = raw.get("avg_fps", 0) or 0
        elapsed = raw.get("elapsed_time")
        entries.append(
            StatusEntry(
                id=instance_id,
                state=state,
                avg_fps=_number(fps, f"avg_fps of {instance_id}"),
                elapsed_time=None if elapsed is None else _number(elapsed, f"elapsed_time of {instance_id}"),
            )
        )
    return entries


@dataclass(frozen=True)
class Merged:
    """The merged list and the workers that could not contribute to it."""

    body: bytes
    missing: list[str]


def merge_status_lists(answers: Sequence[tuple[str, bytes | None]]) -> Merged:
    """Concatenate each worker's list, in worker order, entries untouched.

    ``answers`` holds ``(worker name, body)`` with body None where the worker failed.
    A body that is not a JSON list counts as failed: a client must get a list of
    entries, never a worker's error object spliced in.
    """
    merged: list[Any] = []
    missing = []
    for name, body in answers:
        if body is None:
            missing.append(name)
            continue
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, list):
            missing.append(name)
            continue
        merged.extend(payload)
    return Merged(body=json.dumps(merged).encode() + b"\n", missing=missing)
