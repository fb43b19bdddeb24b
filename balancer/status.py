"""Workers' status lists: read them strictly, merge them for ``GET /pipelines/status``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

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


STATE_ORDER = ("QUEUED", "RUNNING", "COMPLETED", "ERROR", "ABORTED")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class StatusQuery:
    """What ``GET /pipelines/status?...`` asks the balancer for, beyond the workers' own lists."""

    states: frozenset[str] | None = None
    """Keep only entries in these states (``?state=RUNNING,QUEUED``); None keeps all."""
    with_worker: bool = False
    """Add a ``"worker"`` field naming the worker to each entry (``?worker=true``)."""
    forward_query: str = ""
    """Query parameters that are not the balancer's, passed on to the workers unchanged."""


class BadStatusQuery(ValueError):
    """A query the balancer cannot honour; ``payload`` is the JSON body of the 400."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload["error"])
        self.payload = payload


def parse_status_query(query: str) -> StatusQuery:
    """``state=RUNNING,QUEUED&worker=true`` → :class:`StatusQuery`; BadStatusQuery on a bad value.

    States are case-insensitive, comma-separated and may repeat (``state=RUNNING&state=QUEUED``).
    An unknown state is an error, not an empty answer: a typo must not look like "nothing runs".
    """
    states: set[str] = set()
    asked_states = False
    with_worker = False
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "state":
            asked_states = True
            wanted = [v.strip().upper() for v in value.split(",") if v.strip()]
            unknown = [v for v in wanted if v not in STATES]
            if unknown or not wanted:
                raise BadStatusQuery({
                    "error": f"unknown state {', '.join(unknown)}" if unknown else "empty state filter",
                    "parameter": "state",
                    "allowed": list(STATE_ORDER),
                })
            states.update(wanted)
        elif name == "worker":
            word = value.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise BadStatusQuery({
                    "error": f"worker must be true or false, not {value!r}",
                    "parameter": "worker",
                    "allowed": ["true", "false"],
                })
            with_worker = word in TRUE_WORDS
        else:
            rest.append((name, value))
    return StatusQuery(frozenset(states) if asked_states else None, with_worker, urlencode(rest))


def _is_entry(value: Any) -> bool:
    """A status entry as the health poll accepts it (see :func:`parse_status_list`)."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), str) or value.get("state") not in STATES:
        return False
    return all(
        value.get(key) is None or (isinstance(value[key], int | float) and not isinstance(value[key], bool))
        for key in ("avg_fps", "elapsed_time")
    )


def merge_status_lists(
    answers: Sequence[tuple[str, bytes | None]], query: StatusQuery | None = None
) -> Merged:
    """Concatenate each worker's list, in worker order, entries untouched unless ``query`` asks.

    ``answers`` holds ``(worker name, body)`` with body None where the worker failed.
    A body that is not a JSON list counts as failed: a client must get a list of
    entries, never a worker's error object spliced in. ``query`` filters by state and
    adds the ``"worker"`` field (opt-in: strict clients keep the original shape).
    """
    query = query or StatusQuery()
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
        if not isinstance(payload, list) or not all(_is_entry(e) for e in payload):
            missing.append(name)  # garbage from a broken worker is left out, as its health poll says
            continue
        if query.states is not None:
            payload = [e for e in payload if isinstance(e, dict) and e.get("state") in query.states]
        if query.with_worker:
            payload = [{**e, "worker": name} if isinstance(e, dict) else e for e in payload]
        merged.extend(payload)
    return Merged(body=json.dumps(merged).encode() + b"\n", missing=missing)
