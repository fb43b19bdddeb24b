"""Pure decisions about worker pods: label selectors and pod → :class:`WorkerSpec`.

No I/O here, so every rule of DESIGN §4 about *one pod* is unit-testable with
plain dicts (the JSON the API server sends, not kubernetes_asyncio models).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from balancer.config import DiscoverySettings
from balancer.discovery.base import WorkerSpec

DEVICES = ("CPU", "GPU")

# A label key: optional DNS-subdomain prefix and "/", then a name; values are names or empty.
_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
_KEY_RE = re.compile(rf"^{_KEY}$")
_VALUE_RE = re.compile(rf"^{_VALUE}$")
_SET_RE = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_CMP_RE = re.compile(rf"^({_KEY})\s*(==|!=|=)\s*({_VALUE})$")


@dataclass(frozen=True)
class Requirement:
    """One clause of a label selector, e.g. ``app=pipeline-server`` or ``tier notin (a,b)``."""

    key: str
    op: str  # "in", "notin", "exists", "!exists" ("=" is "in" with one value, "!=" is "notin")
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return self.key in labels and labels[self.key] in self.values
        # notin / != also match pods that do not have the label at all (Kubernetes semantics)
        return self.key not in labels or labels[self.key] not in self.values


def _split_clauses(selector: str) -> list[str]:
    """Split on commas that are not inside ``( … )``."""
    clauses: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ')'")
        if ch == "," and depth == 0:
            clauses.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError("unbalanced '('")
    clauses.append("".join(current))
    return [c.strip() for c in clauses]


def _parse_clause(clause: str) -> Requirement:
    if not clause:
        raise ValueError("empty clause")
    if m := _SET_RE.match(clause):
        values = [v.strip() for v in m.group(3).split(",")]
        if not values or any(not v or not _VALUE_RE.match(v) for v in values):
            raise ValueError(f"bad value list in {clause!r}")
        return Requirement(m.group(1), m.group(2), frozenset(values))
    if m := _CMP_RE.match(clause):
        op = "notin" if m.group(2) == "!=" else "in"
        return Requirement(m.group(1), op, frozenset([m.group(3)]))
    if clause.startswith("!") and _KEY_RE.match(clause[1:].strip()):
        return Requirement(clause[1:].strip(), "!exists")
    if _KEY_RE.match(clause):
        return Requirement(clause, "exists")
    raise ValueError(f"cannot parse {clause!r}")


@lru_cache(maxsize=64)
def parse_selector(selector: str) -> tuple[Requirement, ...]:
    """Parse a Kubernetes label selector (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``).

    The empty selector selects everything. Raises ``ValueError`` on bad syntax, so a typo fails at
    start-up rather than silently selecting nothing.
    """
    if not selector.strip():
        return ()
    try:
        return tuple(_parse_clause(c) for c in _split_clauses(selector))
    except ValueError as exc:
        raise ValueError(f"invalid label selector {selector!r}: {exc}") from exc


def selector_problem(selector: Any) -> str | None:
    """A config check: None when ``selector`` parses, else what is wrong."""
    try:
        parse_selector(str(selector))
    except ValueError as exc:
        return f"is not a valid label selector ({exc.__cause__ or exc})"
    return None


def selector_matches(labels: Mapping[str, str] | None, selector: str) -> bool:
    """Does a pod with ``labels`` belong to ``selector``? (All clauses must hold.)"""
    labels = labels or {}
    return all(req.matches(labels) for req in parse_selector(selector))


def pod_key(pod: Mapping[str, Any]) -> str | None:
    """``"<name>/<uid>"``: IPs and names are reused, name + UID never is. None for a malformed pod."""
    meta = pod.get("metadata") or {}
    name, uid = meta.get("name"), meta.get("uid")
    if not name or not uid:
        return None
    return f"{name}/{uid}"


def pod_device(pod: Mapping[str, Any], device_label: str) -> str | None:
    """``CPU``/``GPU`` from the device label, else the owner DaemonSet's or the pod's name (seed naming)."""
    meta = pod.get("metadata") or {}
    value = str((meta.get("labels") or {}).get(device_label, "")).upper() if device_label else ""
    if value in DEVICES:
        return value
    names = [str(ref.get("name", "")) for ref in meta.get("ownerReferences") or []]
    names.append(str(meta.get("name", "")))
    for name in names:
        lowered = name.lower()
        for device in DEVICES:
            if f"-{device.lower()}-worker" in lowered:
                return device
    return None


def _is_ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def pod_to_spec(pod: Mapping[str, Any], settings: DiscoverySettings) -> WorkerSpec | None:
    """The worker a pod describes, or None when it is not a worker (malformed, or outside the selector).

    Routable only with a pod IP, ``Ready=True`` and no ``deletionTimestamp`` (DESIGN §4.4). A pod
    being deleted stays a worker (``terminating``) so its own instances can still be reached.
    """
    key = pod_key(pod)
    meta = pod.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    if key is None or not selector_matches(labels, settings.selector):
        return None
    status = pod.get("status") or {}
    ip = status.get("podIP") or ""
    terminating = bool(meta.get("deletionTimestamp"))
    phase = status.get("phase") or ""
    if terminating:
        reason = "terminating"
    elif not ip:
        reason = "no pod IP"
    elif phase in ("Succeeded", "Failed"):
        reason = f"pod {phase.lower()}"
    elif not _is_ready(status):
        reason = "not ready"
    else:
        reason = ""
    return WorkerSpec(
        key=key,
        name=str(meta["name"]),
        # A pod without an IP has no address yet; the URL is a placeholder nobody may call.
        url=_url(ip, settings.worker_port) if ip else "",
        routable=not reason,
        terminating=terminating,
        device=pod_device(pod, settings.device_label),
        node=(pod.get("spec") or {}).get("nodeName") or None,
        reason=reason,
        labels=labels,
    )


# ---------------------------------------------------------------------------------------------------
# Applying a list and watch events to the table of known workers.


class WatchError(Exception):
    """The API server said no: an HTTP error status or an in-stream ``ERROR`` event."""

    def __init__(self, code: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"{code} {reason}: {message}".rstrip(": "))
        self.code = code
        self.reason = reason
        self.message = message


class ResourceExpired(WatchError):
    """``410 Gone``: the resourceVersion we resume from is compacted away; only a re-list helps."""


class BadEvent(ValueError):
    """A watch line we cannot understand; events may have been missed, so the table must be re-listed."""


def status_error(status: Mapping[str, Any] | None, http_status: int = 0) -> WatchError:
    """The exception for a ``Status`` object (an error body or an ``ERROR`` event's object)."""
    status = status or {}
    code = status.get("code") if isinstance(status.get("code"), int) else http_status
    kind = ResourceExpired if code == 410 else WatchError
    return kind(int(code or 0), str(status.get("reason") or ""), str(status.get("message") or ""))


@dataclass(frozen=True)
class Upsert:
    spec: WorkerSpec


@dataclass(frozen=True)
class Remove:
    key: str


Change = Upsert | Remove


class PodTable:
    """The workers discovery believes in, and the resourceVersion they are valid at.

    ``replace`` takes a full ``PodList``; ``apply`` takes one watch event and answers the changes
    the sink must hear (none when nothing the pool cares about changed). Pure: no I/O, no clock.
    """

    def __init__(self, settings: DiscoverySettings) -> None:
        self._settings = settings
        self.workers: dict[str, WorkerSpec] = {}
        self.resource_version = ""

    def replace(self, pod_list: Mapping[str, Any]) -> list[WorkerSpec]:
        """Install a full list; anything not in it is gone. Returns the specs for ``replace_workers``."""
        if not isinstance(pod_list, Mapping) or not isinstance(pod_list.get("items"), list | None):
            raise BadEvent("a pod list must be an object with 'items'")
        workers: dict[str, WorkerSpec] = {}
        by_name: dict[str, str] = {}
        for pod in pod_list.get("items") or []:
            spec = pod_to_spec(pod, self._settings) if isinstance(pod, Mapping) else None
            if spec is None:
                continue
            if spec.name in by_name:  # cannot happen in one namespace; never keep two workers for one name
                workers.pop(by_name[spec.name])
            workers[spec.key] = spec
            by_name[spec.name] = spec.key
        self.workers = workers
        self.resource_version = str((pod_list.get("metadata") or {}).get("resourceVersion") or "")
        return list(workers.values())

    def apply(self, event: Mapping[str, Any]) -> list[Change]:
        """Apply one watch event. Raises :class:`ResourceExpired`/:class:`WatchError` for ``ERROR``
        events and :class:`BadEvent` for lines that are not events."""
        kind = event.get("type") if isinstance(event, Mapping) else None
        obj = event.get("object") if isinstance(event, Mapping) else None
        if not isinstance(kind, str) or not isinstance(obj, Mapping):
            raise BadEvent(f"not a watch event: {str(event)[:200]}")
        if kind == "ERROR":
            raise status_error(obj)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if not version:
                raise BadEvent("bookmark without a resourceVersion")
            self.resource_version = str(version)
            return []
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise BadEvent(f"unknown watch event type {kind!r}")
        key = pod_key(obj)
        if key is None:
            raise BadEvent(f"{kind} event for a pod without name or uid")
        if version:
            self.resource_version = str(version)
        spec = None if kind == "DELETED" else pod_to_spec(obj, self._settings)
        if spec is None:  # deleted, or its labels left the selector
            return [Remove(key)] if self.workers.pop(key, None) is not None else []
        # Same name, new UID: the old pod is gone for sure (names are unique per namespace), even
        # if its DELETED event was never seen.
        stale = [k for k, s in self.workers.items() if s.name == spec.name and k != key]
        changes: list[Change] = [Remove(k) for k in stale]
        for k in stale:
            del self.workers[k]
        old = self.workers.get(key)
        if old is None or old != spec or old.labels != spec.labels:
            self.workers[key] = spec
            changes.append(Upsert(spec))
        return changes


# ---------------------------------------------------------------------------------------------------
# Retry timing and stream framing.


class Backoff:
    """Exponential backoff with jitter: ``initial`` doubling up to ``cap``, each delay shortened by up
    to ``jitter`` (a fraction) at random so many balancers do not retry in step. Pure: the random
    source is injected."""

    def __init__(self, initial: float, cap: float, rng: random.Random, factor: float = 2.0,
                 jitter: float = 0.25) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.failures = 0
        self._rng = rng

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        base = min(self.cap, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """After a success the next failure waits ``initial`` again."""
        self.failures = 0


class LineBuffer:
    """Split a chunked watch body into JSON lines, however the chunks fall.

    (aiohttp's ``readline`` refuses lines over 128 KiB; a pod with large annotations can exceed that.)
    """

    def __init__(self, max_line: int = 16 * 1024 * 1024) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete, non-empty lines they finish."""
        lines = []
        while data:
            head, sep, data = data.partition(b"\n")
            self._parts.append(head)
            self._size += len(head)
            if self._size > self._max_line:
                raise BadEvent(f"watch line longer than {self._max_line} bytes")
            if not sep:
                break
            line = b"".join(self._parts).strip()
            self._parts, self._size = [], 0
            if line:
                lines.append(line)
        return lines

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished line are buffered (a stream that ends here was cut short)."""
        return any(p.strip() for p in self._parts)
