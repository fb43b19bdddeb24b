"""Admission and worker choice: pure logic, no sockets, an explicit clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.admission import FULL, NOT_READY, PENDING, READY, TERMINATING, UNHEALTHY, Limits, choose, room
from balancer.discovery.base import WorkerSpec
from balancer.pool import Ticket, WorkerPool
from balancer.status import StatusEntry
from balancer.worker import Worker

MAC = "02aabbccddee"


def entry(
    n: int, state: str = "RUNNING", fps: float = 30.0, elapsed: float | None = 10.0, mac: str = MAC
) -> StatusEntry:
    return StatusEntry(f"{n:020x}{mac}", state, fps if state != "QUEUED" else 0.0, elapsed)


def polled(name: str, entries: list[StatusEntry], now: float = 100.0, **spec: object) -> Worker:
    w = Worker(WorkerSpec(key=name, name=name, url=f"http://{name}", **spec))  # type: ignore[arg-type]
    w.observe(entries, now, pending_timeout=15)
    return w


class TestRoom:
    def test_idle_polled_worker_has_room(self) -> None:
        assert room(polled("a", []), Limits(max_running=2), 100.0).state == READY

    def test_states_before_room(self) -> None:
        limits = Limits(max_running=2)
        assert room(Worker(WorkerSpec("a", "a", "http://a")), limits, 0).state == PENDING
        assert room(polled("a", [], routable=False, reason="not ready"), limits, 100).state == NOT_READY
        assert room(polled("a", [], routable=False, terminating=True), limits, 100).state == TERMINATING
        w = polled("a", [])
        w.failed("cannot connect")
        assert room(w, limits, 100).state == UNHEALTHY
        assert "cannot connect" in room(w, limits, 100).reason

    def test_stale_poll_means_unhealthy(self) -> None:
        w = polled("a", [], now=100.0)
        assert room(w, Limits(stale_after=3), 102.9).state == READY
        verdict = room(w, Limits(stale_after=3), 103.5)
        assert verdict.state == UNHEALTHY and "last good poll" in verdict.reason

    def test_max_running_counts_running_queued_and_reserved(self) -> None:
        limits = Limits(max_running=3)
        w = polled("a", [entry(1), entry(2, "QUEUED"), entry(3, "COMPLETED"), entry(4, "ABORTED")])
        assert w.active == 2
        assert room(w, limits, 100).state == READY
        pool = WorkerPool(limits, 15, lambda: 100.0)
        pool.upsert_worker(w.spec)
        pool.observe(pool.workers()[0], [entry(1), entry(2, "QUEUED")])
        assert isinstance(pool.pick(), Ticket)
        assert room(pool.workers()[0], limits, 100).state == FULL

    def test_disabled_limits(self) -> None:
        w = polled("a", [entry(i, fps=1.0) for i in range(50)])
        assert room(w, Limits(max_running=0, target_fps=0), 100).state == READY
        assert room(w, Limits(max_running=-1, target_fps=-5), 100).state == READY

    def test_target_fps_ignores_warming_up_and_queued(self) -> None:
        limits = Limits(target_fps=30, warmup=5)
        assert room(polled("a", [entry(1, fps=12, elapsed=2.0)]), limits, 100).state == READY
        assert room(polled("a", [entry(1, "QUEUED", elapsed=None)]), limits, 100).state == READY
        assert room(polled("a", [entry(1, fps=30.0, elapsed=6.0)]), limits, 100).state == FULL
        assert room(polled("a", [entry(1, fps=30.5, elapsed=6.0)]), limits, 100).state == READY

    def test_current_fps_replaces_lifetime_average_after_two_samples(self) -> None:
        """A stream that slowed down shows it at once, though its cumulative average lags."""
        w = polled("a", [entry(1, fps=40.0, elapsed=60.0)], now=100)
        # 60 s at 40 fps = 2400 frames; then one second at 20 fps: 2420 frames over 61 s.
        w.observe([entry(1, fps=2420 / 61, elapsed=61.0)], 101.0, 15)
        inst = next(iter(w.instances.values()))
        assert inst.avg_fps > 39
        assert abs(inst.fps() - 20.0) < 1e-6
        assert room(w, Limits(target_fps=30), 101).state == FULL


class TestChoose:
    def test_round_robin_skips_workers_without_room(self) -> None:
        workers = [polled("a", []), polled("b", [entry(1)]), polled("c", [])]
        limits = Limits(max_running=1)
        first = choose(workers, 0, limits, 100)
        assert first.worker is workers[0]
        second = choose(workers, first.index + 1, limits, 100)
        assert second.worker is workers[2]
        assert second.passed["b"].state == FULL

    def test_device_pool(self) -> None:
        gpu = polled("g", [], device="GPU")
        cpu = polled("c", [], device="CPU")
        anyw = polled("x", [])
        assert choose([cpu, gpu], 0, Limits(), 100, device="GPU").worker is gpu
        assert choose([gpu, cpu], 0, Limits(), 100, device="CPU").worker is cpu
        assert choose([gpu], 0, Limits(), 100, device="CPU").worker is None
        assert choose([cpu, anyw], 1, Limits(), 100, device="GPU").worker is anyw

    def test_exclude(self) -> None:
        a, b = polled("a", []), polled("b", [])
        assert choose([a, b], 0, Limits(), 100, exclude=frozenset({"a"})).worker is b
        assert choose([a, b], 0, Limits(), 100, exclude=frozenset({"a", "b"})).worker is None


def make_pool(active: list[int], max_running: int) -> WorkerPool:
    pool = WorkerPool(Limits(max_running=max_running), 15, lambda: 100.0)
    for i, n in enumerate(active):
        pool.upsert_worker(WorkerSpec(f"w{i}", f"w{i}", f"http://w{i}"))
        pool.observe(pool.workers()[i], [entry(k, mac=f"{i:012x}") for k in range(n)])
    return pool


@settings(max_examples=200, deadline=None)
@given(
    active=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    max_running=st.integers(1, 5),
    burst=st.integers(0, 40),
    failures=st.sets(st.integers(0, 39)),
)
def test_never_more_admitted_than_free_slots(
    active: list[int], max_running: int, burst: int, failures: set[int]
) -> None:
    """Any burst, with some starts failing (released) in between: admitted == free slots at most,
    and exactly free slots when every start succeeds; no worker goes over its limit."""
    pool = make_pool(active, max_running)
    free = sum(max(0, max_running - n) for n in active)
    admitted = 0
    for i in range(burst):
        ticket = pool.pick()
        if not isinstance(ticket, Ticket):
            continue
        if i in failures:
            pool.release(ticket)
        else:
            pool.confirm(ticket, f"{i:032x}")
            admitted += 1
        for w in pool.workers():
            assert w.load <= max(max_running, w.active)
    assert admitted <= free
    if not failures:
        assert admitted == min(free, burst)


@settings(max_examples=200, deadline=None)
@given(workers=st.integers(1, 8), picks=st.integers(1, 80))
def test_round_robin_is_fair_among_workers_with_room(workers: int, picks: int) -> None:
    """Unlimited room: every worker gets picks//n or picks//n + 1 starts, in rotation."""
    pool = make_pool([0] * workers, max_running=0)
    counts = dict.fromkeys((w.key for w in pool.workers()), 0)
    order = []
    for _ in range(picks):
        ticket = pool.pick()
        assert isinstance(ticket, Ticket)
        counts[ticket.worker.key] += 1
        order.append(ticket.worker.key)
        pool.release(ticket)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert order[:workers] == [w.key for w in pool.workers()][: min(workers, picks)]


def test_reservation_lifecycle() -> None:
    now = [100.0]
    pool = WorkerPool(Limits(max_running=1), pending_timeout=15, clock=lambda: now[0])
    pool.upsert_worker(WorkerSpec("a", "a", "http://a"))
    worker = pool.workers()[0]
    pool.observe(worker, [])
    ticket = pool.pick()
    assert isinstance(ticket, Ticket)
    assert not isinstance(pool.pick(), Ticket)  # the reservation holds the only slot
    pool.confirm(ticket, "1" * 20 + MAC)
    pool.observe(worker, [])  # not listed yet: still reserved
    assert worker.reserved == 1
    pool.observe(worker, [StatusEntry("1" * 20 + MAC, "RUNNING", 30, 1)])
    assert (worker.reserved, worker.active) == (0, 1)
    # a start the worker never lists is dropped after pending_timeout
    pool.observe(worker, [])
    second = pool.pick()
    assert isinstance(second, Ticket)
    pool.confirm(second, "2" * 20 + MAC)
    now[0] += 16
    pool.observe(worker, [])
    assert worker.reserved == 0


def test_owner_lookup_by_learned_id_then_mac() -> None:
    pool = make_pool([2, 1], max_running=0)
    a, b = pool.workers()
    assert pool.owner_of(f"{1:020x}{0:012x}") is a
    assert pool.owner_of("f" * 20 + f"{1:012x}") is b  # never listed, found by MAC suffix
    assert pool.owner_of("f" * 32) is None
    pool.remove_worker(a.key)
    assert pool.owner_of(f"{1:020x}{0:012x}") is None


def test_replace_workers_removes_missing_and_keeps_state() -> None:
    pool = make_pool([1, 1], max_running=0)
    kept = pool.get("w1")
    pool.replace_workers([WorkerSpec("w1", "w1", "http://w1"), WorkerSpec("w9", "w9", "http://w9")])
    assert [w.key for w in pool.workers()] == ["w1", "w9"]
    assert pool.get("w1") is kept and kept is not None and kept.active == 1


def test_state_events() -> None:
    pool = WorkerPool(Limits(max_running=1), 15, lambda: 100.0)
    events: list[tuple[str, str | None]] = []
    pool.listeners.append(lambda kind, f: events.append((kind, f.get("state"))))
    pool.upsert_worker(WorkerSpec("a", "a", "http://a"))
    w = pool.workers()[0]
    pool.observe(w, [])
    pool.observe(w, [entry(1)])
    pool.failed(w, "boom")
    pool.remove_worker("a")
    assert events == [
        ("joined", None),
        ("state", "pending"),
        ("state", "ready"),
        ("state", "full"),
        ("state", "unhealthy"),
        ("left", None),
    ]
