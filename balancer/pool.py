"""The table of workers: discovery feeds it, the poller updates it, the dispatcher picks from it.

Every method is synchronous. Asyncio runs one of them at a time, so "is there
room?" and "reserve the slot" happen in one step: a burst of concurrent starts
can never be admitted past the free slots.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from balancer.admission import ROUND_ROBIN, Choice, Limits, Room, choose, in_pool, room
from balancer.discovery.base import WorkerSpec
from balancer.instance import mac_suffix
from balancer.status import StatusEntry
from balancer.worker import Reservation, Worker

log = logging.getLogger("balancer.pool")

StateListener = Callable[[str, dict[str, Any]], None]
"""Called with (event, fields) on every worker state change: ``joined``, ``left``, ``state``."""


@dataclass(frozen=True)
class Ticket:
    """A reserved slot on a worker for one start."""

    worker: Worker
    token: int
    fallback: str | None = None
    """The device pool the start was moved to (``DEVICE_FALLBACK``): its body must ask for it."""


class WorkerPool:
    def __init__(
        self,
        limits: Limits,
        pending_timeout: float,
        clock: Callable[[], float],
        strategy: str = ROUND_ROBIN,
        fallback: Mapping[str, str] | None = None,
    ) -> None:
        self.limits = limits
        self.pending_timeout = pending_timeout
        self.clock = clock
        self.strategy = strategy
        self.fallback = dict(fallback or {})
        """Requested device pool -> the pool to try when it has no room (``{"GPU": "CPU"}``)."""
        self._workers: dict[str, Worker] = {}
        self._owners: dict[str, str] = {}
        """instance id -> worker key, for every id a worker has listed or a start returned."""
        self._owned: dict[str, set[str]] = {}
        """worker key -> the ids ``_owners`` gives it (so a poll can forget the ones its worker no longer lists)."""
        self._cursor = 0
        self._any_cursor = 0
        self._tokens = itertools.count(1)
        self._states: dict[str, str] = {}
        self.listeners: list[StateListener] = []

    # ---- discovery sink -------------------------------------------------------------
    def replace_workers(self, specs: list[WorkerSpec]) -> None:
        wanted = {s.key: s for s in specs}
        for key in [k for k in self._workers if k not in wanted]:
            self.remove_worker(key)
        for spec in specs:
            self.upsert_worker(spec)

    def upsert_worker(self, spec: WorkerSpec) -> None:
        worker = self._workers.get(spec.key)
        if worker is None:
            self._workers[spec.key] = Worker(spec)
            self._emit("joined", self._workers[spec.key])
        elif worker.spec != spec:
            worker.spec = spec
        self._note_state(self._workers[spec.key])

    def remove_worker(self, key: str) -> None:
        worker = self._workers.pop(key, None)
        if worker is None:
            return
        self._owners = {i: k for i, k in self._owners.items() if k != key}
        self._owned.pop(key, None)
        self._states.pop(key, None)
        self._emit("left", worker)

    # ---- reading ----------------------------------------------------------------------
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, key: str) -> Worker | None:
        return self._workers.get(key)

    def room(self, worker: Worker) -> Room:
        return room(worker, self.limits, self.clock())

    def owner_of(self, instance_id: str) -> Worker | None:
        """The worker that runs ``instance_id``: learned from starts and polls, else by its MAC suffix."""
        key = self._owners.get(instance_id)
        if key is not None and key in self._workers:
            return self._workers[key]
        mac = mac_suffix(instance_id)
        if mac is not None:
            for worker in self._workers.values():
                if mac in worker.macs:
                    return worker
        return None

    def learn_owner(self, instance_id: str, worker: Worker) -> None:
        if worker.key in self._workers:
            self._set_owner(instance_id, worker.key)

    def _set_owner(self, instance_id: str, key: str) -> None:
        previous = self._owners.get(instance_id)
        if previous is not None and previous != key:
            self._owned.get(previous, set()).discard(instance_id)
        self._owners[instance_id] = key
        self._owned.setdefault(key, set()).add(instance_id)

    def to_dict(self) -> dict[str, Any]:
        now = self.clock()
        workers = []
        for worker in self._workers.values():
            verdict = room(worker, self.limits, now)
            workers.append(worker.to_dict(now, verdict.state, verdict.reason, worker.estimate()))
        return {"workers": workers, "instances_known": len(self._owners)}

    # ---- admission ----------------------------------------------------------------------
    def pick(self, device: str | None = None, exclude: frozenset[str] = frozenset()) -> Ticket | Choice:
        """Reserve a slot on the worker the strategy picks among those with room in the device pool,
        then in its fallback pool if one is configured; or say why there is none."""
        workers = self.workers()
        now = self.clock()
        choice = choose(workers, self._cursor, self.limits, now, device, exclude, self.strategy)
        moved_to = None
        if choice.worker is None and device is not None and device in self.fallback:
            moved_to = self.fallback[device]
            # workers of no known device are in every pool: they were just tried
            tried = exclude | {w.key for w in workers if in_pool(w, device)}
            second = choose(workers, self._cursor, self.limits, now, moved_to, tried, self.strategy)
            second.passed = {**choice.passed, **second.passed}
            second.fallback = moved_to
            choice = second
        if choice.worker is None:
            return choice
        self._cursor = choice.index + 1
        token = next(self._tokens)
        choice.worker.reservations[token] = Reservation(token, now)
        self._note_state(choice.worker)
        return Ticket(choice.worker, token, moved_to)

    def confirm(self, ticket: Ticket, instance_id: str, live: bool = False) -> None:
        """The worker accepted the start: hold the slot until its status list shows the id.

        ``live``: the start's source is live, so its fps is no measure of the worker's capacity.
        """
        res = ticket.worker.reservations.get(ticket.token)
        if res is not None:
            res.instance_id = instance_id
            res.since = self.clock()
        if live:
            ticket.worker.live.add(instance_id)
        self.learn_owner(instance_id, ticket.worker)

    def release(self, ticket: Ticket) -> None:
        """The start failed or was refused: free the slot now."""
        ticket.worker.reservations.pop(ticket.token, None)
        self._note_state(ticket.worker)

    def pick_any(self) -> Worker | None:
        """A worker for requests any worker can answer (definitions, models): healthy ones first."""
        workers = self.workers()
        if not workers:
            return None
        now = self.clock()
        for step in range(len(workers)):
            worker = workers[(self._any_cursor + step) % len(workers)]
            if room(worker, self.limits, now).state in ("ready", "full"):
                self._any_cursor = (self._any_cursor + step + 1) % len(workers)
                return worker
        return None

    # ---- health -------------------------------------------------------------------------
    def observe(self, worker: Worker, entries: list[StatusEntry]) -> None:
        """A good poll of ``worker``: take in its instances and learn who owns them."""
        if self._workers.get(worker.key) is not worker:
            return  # removed while the poll was on its way
        self._log_lost(worker, worker.observe(entries, self.clock(), self.pending_timeout))
        for entry in entries:
            self._set_owner(entry.id, worker.key)
        self._forget_unlisted(worker, {entry.id for entry in entries})
        self._note_state(worker)

    def _forget_unlisted(self, worker: Worker, listed: set[str]) -> None:
        """A worker never drops an instance from its status list, so an id it no longer lists (and that is not
        a start on its way) went with a restarted process (a container restart keeps the pod; a static worker
        comes back on its address). Forgetting them keeps the owner table from growing with every restart."""
        owned = self._owned.get(worker.key)
        if not owned or owned <= listed:
            return
        for instance_id in owned - listed - worker.pending_ids():
            owned.discard(instance_id)
            if self._owners.get(instance_id) == worker.key:
                del self._owners[instance_id]

    def failed(self, worker: Worker, error: str) -> None:
        if self._workers.get(worker.key) is not worker:
            return
        worker.failed(error)
        # a worker that died right after accepting a start, and never comes back, must not hold its slot forever
        self._log_lost(worker, worker.settle_reservations(set(), self.clock(), self.pending_timeout))
        self._note_state(worker)

    @staticmethod
    def _log_lost(worker: Worker, lost: list[str]) -> None:
        for instance_id in lost:
            log.warning("start %s never appeared in %s's status list; slot released", instance_id, worker.name)

    def refresh_states(self) -> None:
        """Re-derive every worker's state (time alone can make a poll stale)."""
        for worker in self._workers.values():
            self._note_state(worker)

    # ---- events -------------------------------------------------------------------------
    def _note_state(self, worker: Worker) -> None:
        verdict = room(worker, self.limits, self.clock())
        if self._states.get(worker.key) != verdict.state:
            self._states[worker.key] = verdict.state
            self._emit("state", worker, state=verdict.state, reason=verdict.reason)

    def _emit(self, event: str, worker: Worker, **fields: Any) -> None:
        payload: dict[str, Any] = {"worker": worker.name}
        if worker.key != worker.name:
            payload["key"] = worker.key
        if worker.spec.url != worker.name:
            payload["url"] = worker.spec.url
        payload.update(fields)
        for listener in self.listeners:
            try:
                listener(event, payload)
            except Exception:  # a dashboard's listener must never break routing
                log.exception("state listener failed for %s", event)
