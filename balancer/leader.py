"""Active-passive HA: leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection.

Two replicas run; the one holding the Lease is the leader: it alone reports ready and serves pipeline
routes, so admission stays exact (two replicas admitting at once would each count only their own
starts). The other is a warm standby: it watches pods and polls workers, and takes over when the
leader is gone.

The decisions are in :class:`Election`, pure and synchronous with the clock passed in; the I/O
(read, create, replace the Lease through kubernetes_asyncio) and the timing are in
:class:`LeaderElector`. The rules, client-go's:

- No Lease: create one naming ourselves. Two creators race; the API server lets one win (409
  AlreadyExists for the other).
- A Lease held by someone else is taken over only once it has not changed for
  ``leaseDurationSeconds`` by *our own* monotonic clock, counted from when we first saw it in its
  current version. The ``renewTime`` inside was written with another machine's wall clock and is
  never compared with ours, so wall-clock skew between nodes cannot cause an early takeover.
- Every write carries the ``metadata.resourceVersion`` we read: a stale one is refused with 409
  Conflict, so of two candidates acting on the same observation at most one wins.
- The holder renews every retry period and counts itself leader only until ``renew_deadline`` after
  the *sending* of its last successful write; ``renew_deadline < lease_duration`` leaves the margin
  for the standby's read period and for clocks that run at slightly different rates.
- On shutdown the leader releases the Lease (holder cleared, ``leaseDurationSeconds: 1``, as
  client-go's ``ReleaseOnCancel``) so a standby takes it at its next read instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp

from balancer.config import HaSettings

log = logging.getLogger("balancer.leader")

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""Kubernetes ``MicroTime`` (Go layout ``2006-01-02T15:04:05.000000Z07:00``), always written in UTC."""

RELEASED_DURATION = 1
"""``leaseDurationSeconds`` of a released Lease (client-go writes 1)."""

CANDIDATE_JITTER = 0.2
"""A candidate's read period is stretched by up to this fraction at random, so replicas drift apart."""


def format_micro_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(MICRO_TIME)


def parse_micro_time(text: Any) -> float | None:
    """Unix seconds of an RFC 3339 time (``MicroTime`` or ``Time``); None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def resolve_identity(configured: str) -> str:
    """The configured identity (``$POD_NAME`` in a pod), else ``<hostname>-<pid>``: unique per process."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


# ---- the Lease as data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """What matters of a Lease. Equality is the version and the spec: any change restarts a standby's wait."""

    holder: str = ""
    duration: int = 0
    """``leaseDurationSeconds``."""
    acquire_time: float | None = None
    renew_time: float | None = None
    """Wall-clock Unix seconds, written by the holder's clock: shown, never used to decide."""
    transitions: int = 0
    resource_version: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The object's metadata as read (labels, annotations, uid …), sent back unchanged on update."""

    @classmethod
    def from_object(cls, obj: Any) -> LeaseRecord:
        """From the API server's JSON. Raises ``ValueError`` on something that is not a Lease."""
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            raise ValueError("not a Lease object")
        spec = obj.get("spec") or {}
        if not isinstance(spec, dict):
            raise ValueError("Lease spec is not an object")
        meta = obj["metadata"]
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=_int(spec.get("leaseDurationSeconds")),
            acquire_time=parse_micro_time(spec.get("acquireTime")),
            renew_time=parse_micro_time(spec.get("renewTime")),
            transitions=_int(spec.get("leaseTransitions")),
            resource_version=str(meta.get("resourceVersion") or ""),
            metadata=dict(meta),
        )

    def to_object(self, name: str, namespace: str) -> dict[str, Any]:
        """The body of a create (no resourceVersion) or an update (with the version read)."""
        meta = {k: v for k, v in self.metadata.items() if k not in ("resourceVersion", "managedFields")}
        meta.update(name=name, namespace=namespace)
        if self.resource_version:
            meta["resourceVersion"] = self.resource_version
        spec: dict[str, Any] = {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration,
                                "leaseTransitions": self.transitions}
        if self.acquire_time is not None:
            spec["acquireTime"] = format_micro_time(self.acquire_time)
        if self.renew_time is not None:
            spec["renewTime"] = format_micro_time(self.renew_time)
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def to_dict(self) -> dict[str, Any]:
        """For ``/backends``."""
        return {
            "holder": self.holder or None,
            "duration": self.duration,
            "acquire_time": format_micro_time(self.acquire_time) if self.acquire_time is not None else None,
            "renew_time": format_micro_time(self.renew_time) if self.renew_time is not None else None,
            "transitions": self.transitions,
            "resource_version": self.resource_version,
        }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ---- decisions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Nothing to write: the Lease is someone else's and still valid."""

    reason: str


@dataclass(frozen=True)
class Create:
    """There is no Lease: create this one."""

    record: LeaseRecord
    sent_at: float
    """Our clock when the decision was made, i.e. before the write: leadership counts from here."""


@dataclass(frozen=True)
class Update:
    """Write this over the version read (acquire, renew or release)."""

    record: LeaseRecord
    sent_at: float


Action = Wait | Create | Update


class Election:
    """client-go's ``tryAcquireOrRenew`` as a state machine over (Lease read, now) → action.

    ``now`` is a monotonic clock of this replica; ``wall`` (Unix seconds) only goes into the
    timestamps written in the Lease for people to read. The caller reads the Lease, calls
    :meth:`decide`, performs the action and reports the outcome with :meth:`succeeded`,
    :meth:`conflict` or nothing (an error whose outcome is unknown changes nothing: leadership
    lapses by the clock alone).
    """

    def __init__(self, identity: str, lease_duration: int, renew_deadline: float, retry_period: float) -> None:
        if not identity:
            raise ValueError("an election needs an identity")
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.observed: LeaseRecord | None = None
        self.observed_at: float | None = None
        """Our clock when ``observed`` was first seen in its current version."""
        self.renewed_at: float | None = None
        """Our clock when our last successful write as holder was *sent* (None: we do not hold it)."""
        self.released = False
        self.terms = 0
        """How many times this replica became the leader."""

    # ---- reading the state ----
    def is_leader(self, now: float) -> bool:
        """Holder of the Lease by the API server's last word, and renewed within the renew deadline."""
        return (
            not self.released
            and self.renewed_at is not None
            and self.observed is not None
            and self.observed.holder == self.identity
            and now < self.renewed_at + self.renew_deadline
        )

    @property
    def holder(self) -> str:
        """The holder in the last Lease seen ("" when free or unknown)."""
        return self.observed.holder if self.observed is not None else ""

    def expires_at(self) -> float | None:
        """Our clock when another holder's Lease may be taken over; None when it is free, ours or unseen."""
        lease = self.observed
        if lease is None or self.observed_at is None or not lease.holder or lease.holder == self.identity:
            return None
        return self.observed_at + (lease.duration if lease.duration > 0 else self.lease_duration)

    def next_delay(self, now: float, jitter: float = 0.0) -> float:
        """Seconds until the next read: the retry period (a candidate's stretched by ``jitter`` in [0, 1)),
        but a candidate wakes up right when the Lease it waits for expires."""
        if self.is_leader(now):
            return self.retry_period
        delay = self.retry_period * (1 + CANDIDATE_JITTER * jitter)
        expiry = self.expires_at()
        if expiry is not None and expiry > now:
            delay = min(delay, expiry - now + 0.001)
        return delay

    # ---- deciding ----
    def decide(self, lease: LeaseRecord | None, now: float, wall: float) -> Action:
        """What to write, given the Lease just read (None: there is none)."""
        if self.released:
            return Wait("released")
        self._observe(lease, now)
        if lease is None:
            return Create(LeaseRecord(self.identity, self.lease_duration, wall, wall, 0), now)
        if lease.holder == self.identity:
            # Ours by the API server's word (also after a restart under the same identity): renew.
            renewed = dataclasses.replace(lease, duration=self.lease_duration, renew_time=wall,
                                          acquire_time=lease.acquire_time if lease.acquire_time is not None else wall)
            return Update(renewed, now)
        expiry = self.expires_at()
        if lease.holder and expiry is not None and now < expiry:
            return Wait(f"lease held by {lease.holder}")
        taken = dataclasses.replace(lease, holder=self.identity, duration=self.lease_duration, acquire_time=wall,
                                    renew_time=wall, transitions=lease.transitions + 1)
        return Update(taken, now)

    def succeeded(self, action: Create | Update, result: LeaseRecord, now: float) -> bool:
        """The write was accepted; ``result`` is the Lease as the API server returned it.
        Returns True when this made us the leader (we were not before)."""
        was_leader = self.is_leader(now)
        self.observed, self.observed_at = result, now
        self.renewed_at = action.sent_at if result.holder == self.identity and not self.released else None
        became = not was_leader and self.is_leader(now)
        if became:
            self.terms += 1
        return became

    def conflict(self, now: float) -> None:
        """409: the Lease changed since we read it (someone else wrote): we do not hold it any more."""
        self.renewed_at = None

    def release(self, now: float, wall: float, lease: LeaseRecord | None = None) -> Update | None:
        """Stop leading at once and, if the Lease (``lease`` or the last seen) names us, the write that
        hands it over: holder cleared, so a standby takes it at its next read."""
        self.released = True
        self.renewed_at = None
        lease = lease if lease is not None else self.observed
        if lease is None or lease.holder != self.identity:
            return None
        return Update(dataclasses.replace(lease, holder="", duration=RELEASED_DURATION, acquire_time=wall,
                                          renew_time=wall), now)

    def _observe(self, lease: LeaseRecord | None, now: float) -> None:
        if lease is None or self.observed is None or lease != self.observed:
            self.observed, self.observed_at = lease, now
        if lease is None or lease.holder != self.identity:
            self.renewed_at = None  # someone else holds it (or it is gone): step down at once


# ---- I/O -------------------------------------------------------------------------------------------------


class LeaseConflict(Exception):
    """409: a stale resourceVersion on update, or AlreadyExists on create."""


class LeaseApiError(Exception):
    """Any other refusal of the API server (401/403: RBAC; 404 on update; 5xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class LeaseApi:
    """Reads and writes one Lease through kubernetes_asyncio's ``CoordinationV1Api`` (auth, TLS, URLs),
    answered as raw responses that we check ourselves, as discovery does for pods."""

    def __init__(self, api_client: Any, namespace: str, name: str, timeout: float) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self.timeout = timeout

    async def get(self) -> LeaseRecord | None:
        """The Lease, or None when there is none (404)."""
        from kubernetes_asyncio import client

        api = client.CoordinationV1Api(self.api_client)
        resp = await api.read_namespaced_lease(self.name, self.namespace, **self._options())
        status, body = await _read(resp)
        if status == 404:
            return None
        return _lease_or_raise(status, body)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        from kubernetes_asyncio import client

        api = client.CoordinationV1Api(self.api_client)
        body: Any = record.to_object(self.name, self.namespace)  # a dict serialises as the model would
        resp = await api.create_namespaced_lease(self.namespace, body, **self._options())
        return _lease_or_raise(*await _read(resp))

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        from kubernetes_asyncio import client

        api = client.CoordinationV1Api(self.api_client)
        body: Any = record.to_object(self.name, self.namespace)
        resp = await api.replace_namespaced_lease(self.name, self.namespace, body, **self._options())
        return _lease_or_raise(*await _read(resp))

    def _options(self) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": aiohttp.ClientTimeout(total=self.timeout)}


async def _read(resp: Any) -> tuple[int, bytes]:
    raw = cast(aiohttp.ClientResponse, resp)
    try:
        return raw.status, await raw.read()
    finally:
        raw.release()


def _lease_or_raise(status: int, body: bytes) -> LeaseRecord:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if status == 409:
        raise LeaseConflict(_message(obj) or "conflict")
    if not 200 <= status < 300:
        raise LeaseApiError(status, _message(obj) or body[:200].decode(errors="replace"))
    try:
        return LeaseRecord.from_object(obj)
    except ValueError as exc:
        raise LeaseApiError(status, f"unreadable Lease: {exc}") from None


def _message(obj: Any) -> str:
    return str(obj.get("message") or obj.get("reason") or "") if isinstance(obj, dict) else ""


ApiFactory = Callable[[str], Awaitable[Any]]


async def _default_api_factory(kubeconfig: str) -> Any:
    from balancer.discovery.kubernetes import make_api_client

    return await make_api_client(kubeconfig)


class LeaderElector:
    """The election loop: read the Lease every retry period, act on :class:`Election`'s decision.

    ``run`` is owned by the server and cancelled on shutdown; being cancelled while leading releases
    the Lease first (bounded by the call timeout), so the standby takes over at once.
    """

    def __init__(
        self,
        settings: HaSettings,
        namespace: str,
        kubeconfig: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        api_factory: ApiFactory = _default_api_factory,
    ) -> None:
        self.settings = settings
        self.namespace = namespace
        self.identity = resolve_identity(settings.identity)
        self.election = Election(self.identity, settings.lease_duration, settings.renew_deadline,
                                 settings.retry_period)
        self.call_timeout = max(1.0, settings.retry_period)
        """Bound of each API call: a hung call must not eat the leader's renew deadline."""
        self._kubeconfig = kubeconfig
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._api_factory = api_factory
        self._api_client: Any = None
        self._lease: LeaseApi | None = None
        self._leading = False
        self._holder_logged: str | None = None
        self.release_on_cancel = True
        """Hand the Lease over when cancelled while leading (client-go's ``ReleaseOnCancel``)."""
        self.on_leading: list[Callable[[], None]] = []
        """Called (synchronously) each time this replica becomes the leader."""
        self.last_error = ""
        self.last_error_at: float | None = None

    # ---- state ----
    def is_leader(self) -> bool:
        return self.election.is_leader(self._clock())

    @property
    def holder(self) -> str:
        return self.election.holder

    def to_dict(self) -> dict[str, Any]:
        """For ``/backends`` and the metrics."""
        now = self._clock()
        e = self.election
        expiry = e.expires_at()
        return {
            "enabled": True,
            "identity": self.identity,
            "leader": e.holder or None,
            "is_leader": e.is_leader(now),
            "lease": None if e.observed is None else {
                "name": self.settings.lease_name, "namespace": self.namespace, **e.observed.to_dict()},
            "seen_unchanged_for": None if e.observed_at is None else round(now - e.observed_at, 3),
            "takeover_in": None if expiry is None else round(max(0.0, expiry - now), 3),
            "terms": e.terms,
            "settings": {"lease_duration": self.settings.lease_duration,
                         "renew_deadline": self.settings.renew_deadline,
                         "retry_period": self.settings.retry_period},
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    # ---- the loop ----
    async def run(self) -> None:
        """Elect until cancelled; never raises anything but ``CancelledError``."""
        try:
            while True:
                await self._step()
                await self._sleep(self.election.next_delay(self._clock(), self._rng.random()))
        except asyncio.CancelledError:
            if self.release_on_cancel:
                await self._release()
            raise
        finally:
            client, self._api_client, self._lease = self._api_client, None, None
            if client is not None:
                await client.close()

    async def _step(self) -> None:
        try:
            lease_api = await self._lease_api()
            lease = await lease_api.get()
            action = self.election.decide(lease, self._clock(), self._wall())
            if isinstance(action, Create):
                result = await lease_api.create(action.record)
            elif isinstance(action, Update):
                result = await lease_api.replace(action.record)
            else:
                self._recovered()  # a read was all this step needed
                return
            if self.election.succeeded(action, result, self._clock()):
                log.info("leader election: %s became the leader (lease %s/%s, transitions %d)", self.identity,
                         self.namespace, self.settings.lease_name, result.transitions)
            self._recovered()
        except asyncio.CancelledError:
            raise
        except LeaseConflict as exc:
            self.election.conflict(self._clock())
            log.info("leader election: lease changed under us (%s); reading it again", exc)
        except Exception as exc:  # API server down, RBAC, credentials: retried next period
            self._fail(exc)
        finally:
            self._notice_changes()

    async def _lease_api(self) -> LeaseApi:
        if self._lease is None:
            self._api_client = await self._api_factory(self._kubeconfig)
            self._lease = LeaseApi(self._api_client, self.namespace, self.settings.lease_name, self.call_timeout)
        return self._lease

    async def _release(self) -> None:
        """Hand the Lease over if it names us: with the version last seen, and once more with a fresh
        read if that one is stale (e.g. a renewal cut short by the cancel went through)."""
        action = self.election.release(self._clock(), self._wall())
        self._notice_changes()
        if self._lease is None:
            return
        for attempt in range(2):
            try:
                if attempt:
                    action = self.election.release(self._clock(), self._wall(), await self._lease.get())
                if action is None:
                    return
                await self._lease.replace(action.record)
                log.info("leader election: %s released the lease", self.identity)
                return
            except LeaseConflict:
                continue
            except Exception as exc:  # the standby will wait the lease out
                self._fail(exc)
                return
        log.warning("leader election: could not release the lease; the standby waits for it to expire")

    def _recovered(self) -> None:
        if self.last_error:
            log.info("leader election: the lease API answers again")
            self.last_error = ""

    def _fail(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"[:500]
        if text != self.last_error:
            log.warning("leader election: %s", text)
        self.last_error, self.last_error_at = text, self._wall()

    def _notice_changes(self) -> None:
        """Log leadership and holder changes once; tell listeners about a new term."""
        leading = self.is_leader()
        if leading and not self._leading:
            for listener in self.on_leading:
                try:
                    listener()
                except Exception:
                    log.exception("on_leading listener failed")
        elif self._leading and not leading:
            holder = self.election.holder
            if self.election.released:
                log.info("leader election: %s stops leading to release the lease", self.identity)
            elif holder == self.identity:
                log.warning("leader election: %s could not renew the lease within %ss; no longer the leader",
                            self.identity, self.settings.renew_deadline)
            else:
                log.warning("leader election: %s is no longer the leader (lease held by %s)", self.identity,
                            holder or "nobody")
        self._leading = leading
        holder = self.election.holder
        if not leading and holder != self._holder_logged and holder != self.identity:
            log.info("leader election: standby; lease held by %s", holder or "nobody")
        self._holder_logged = holder
