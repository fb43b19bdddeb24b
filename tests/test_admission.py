"""Admission and worker choice: pure logic, no sockets, an explicit clock."""

from __future__ import annotations

import json

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from balancer.admission import (
    FULL,
    LEAST_PIPELINES,
    MOST_HEADROOM,
    NOT_READY,
    PENDING,
    READY,
    ROUND_ROBIN,
    TERMINATING,
    UNHEALTHY,
    Choice,
    Limits,
    choose,
    headroom,
    live_source,
    retarget_device,
    room,
)
from balancer.discovery.base import WorkerSpec
from balancer.pool import Ticket, WorkerPool
from balancer.sim.engine import fair_shares
from balancer.status import StatusEntry
from balancer.worker import CAPACITY_WINDOW, Reservation, Worker

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


# ---- predictive FPS admission (DESIGN §3) ------------------------------------------------------

PREDICTIVE = Limits(target_fps=30, warmup=5, predictive=True, stale_after=1e9)


class Streams:
    """Drives a Worker with the simulator's capacity model: polls at chosen times, exact frames."""

    def __init__(self, capacity: float, live_fps: float = 30.0) -> None:
        self.capacity = capacity
        self.live_fps = live_fps
        self.t = 100.0
        self.started: dict[str, float] = {}
        self.frames: dict[str, float] = {}
        self.live: set[str] = set()
        self.loading: dict[str, float] = {}
        """id -> until when it loads its model: RUNNING, no frames, no share."""
        self.stopped: dict[str, tuple[float, float]] = {}
        self.worker = Worker(WorkerSpec("w", "w", "http://w"))

    def rates(self, factor: float = 1.0) -> dict[str, float]:
        ids = [i for i in self.started if self.loading.get(i, 0.0) <= self.t]
        caps = [self.live_fps if i in self.live else None for i in ids]
        return {i: r * factor for i, r in zip(ids, fair_shares(self.capacity, caps), strict=True)}

    def add(self, live: bool = False, mark_live: bool = True, loading: float = 0.0) -> str:
        instance_id = f"{len(self.started) + 1:020x}{MAC}"
        self.started[instance_id] = self.t
        self.frames[instance_id] = 0.0
        if loading:
            self.loading[instance_id] = self.t + loading
        if live:
            self.live.add(instance_id)
            if mark_live:
                self.worker.live.add(instance_id)
        return instance_id

    def run(self, seconds: float, factor: float = 1.0) -> None:
        for instance_id, rate in self.rates(factor).items():
            self.frames[instance_id] += rate * seconds
        self.t += seconds

    def stop(self, instance_id: str) -> None:
        """ABORTED: still listed, as on the real server, with its final frames and elapsed time."""
        self.stopped[instance_id] = (self.frames[instance_id], self.t - self.started.pop(instance_id))

    def poll(self, whole_frames: bool = False) -> None:
        """One status poll; ``whole_frames``: avg_fps counts whole frames only, as the real server's."""
        entries = [
            StatusEntry(i, "RUNNING", (int(self.frames[i]) if whole_frames else self.frames[i]) / (self.t - s)
                        if self.t > s else 0.0, self.t - s)
            for i, s in self.started.items()
        ] + [StatusEntry(i, "ABORTED", f / e, e) for i, (f, e) in self.stopped.items()]
        self.worker.observe(entries, self.t, pending_timeout=15)

    def settle(self, polls: int = 3, every: float = 1.0) -> None:
        for _ in range(polls):
            self.run(every)
            self.poll()


class TestPredictive:
    def test_capacity_is_the_sum_over_a_stable_window(self) -> None:
        s = Streams(130)
        for _ in range(3):
            s.add()
        s.run(6)  # past warm-up
        s.poll()
        assert s.worker.capacity is None  # one poll is no window
        s.settle(2)
        est = s.worker.estimate()
        assert est is not None and s.worker.capacity is not None
        assert abs(est.capacity_fps - 130) < 1e-6 and s.worker.capacity.streams == 3
        assert abs(est.predicted_fps - 130 / 4) < 1e-6  # 32.5 > 30
        assert room(s.worker, PREDICTIVE, s.t).state == READY

    def test_refuses_the_start_that_would_push_streams_below_target(self) -> None:
        s = Streams(130)
        for _ in range(4):
            s.add()
        s.run(6)
        s.poll()
        s.settle(2)
        # every stream runs at 32.5 > 30: the seed's rule sees room, the prediction (26) does not
        assert room(s.worker, Limits(target_fps=30, warmup=5, stale_after=1e9), s.t).state == READY
        verdict = room(s.worker, PREDICTIVE, s.t)
        assert verdict.state == FULL
        assert "~26.0 fps <= TARGET_FPS 30" in verdict.reason and "shared by 5" in verdict.reason

    def test_reservations_and_queued_count_as_sharing(self) -> None:
        s = Streams(130)
        for _ in range(3):
            s.add()
        s.run(6)
        s.poll()
        s.settle(2)
        assert room(s.worker, PREDICTIVE, s.t).state == READY
        s.worker.reservations[1] = Reservation(1, s.t)  # a start in flight
        est = s.worker.estimate()
        assert est is not None and est.sharing == 4 and abs(est.predicted_fps - 26) < 1e-6
        assert room(s.worker, PREDICTIVE, s.t).state == FULL

    def test_capacity_holds_while_streams_start_and_stop(self) -> None:
        """Every frame counts, so a window in which streams come and go still measures the worker:
        starts one after another need no quiet poll in between."""
        s = Streams(130)
        first = s.add()
        s.add()
        s.settle(2)
        for _ in range(3):
            s.run(0.5)
            s.add()  # a stream starts between two polls
            s.run(0.5)
            s.poll()
            assert s.worker.capacity is not None and abs(s.worker.capacity.fps - 130) < 1e-6
        s.run(0.3)
        s.stop(first)
        s.run(0.7)
        s.poll()
        assert s.worker.capacity.streams == 4 and abs(s.worker.capacity.fps - 130) < 1e-6

    def test_no_estimate_while_the_only_stream_loads_its_model(self) -> None:
        """A pipeline that has not made a frame yet says nothing of the worker's capacity."""
        s = Streams(130)
        s.add(loading=3.0)
        s.settle(3)
        assert s.worker.capacity is None and s.worker.estimate() is None
        assert room(s.worker, PREDICTIVE, s.t).state == READY  # then the other rules decide
        s.settle(2)
        est = s.worker.estimate()
        assert est is not None and abs(est.capacity_fps - 130) < 1e-6
        # a second stream still loading takes no frames now, but will take a share: it counts
        s.add(loading=5.0)
        s.settle(2)
        est = s.worker.estimate()
        assert est is not None and abs(est.capacity_fps - 130) < 1e-6 and est.sharing == 2

    def test_live_streams_say_nothing_about_capacity(self) -> None:
        """Two cameras at 30 fps on a 130 fps worker: no estimate, not "capacity 60"."""
        s = Streams(130)
        s.add(live=True)
        s.add(live=True)
        s.run(6)
        s.poll()
        s.settle(2)
        assert s.worker.estimate() is None
        assert all(i.live for i in s.worker.instances.values())
        limits = Limits(target_fps=25, warmup=5, predictive=True, stale_after=1e9)
        assert room(s.worker, limits, s.t).state == READY
        # a file stream takes what the cameras leave: capacity 130, and the next file start would
        # share 130 - 60 with it: 35 fps each
        s.add()
        s.run(6)
        s.poll()
        s.settle(2)
        est = s.worker.estimate()
        assert est is not None and est.sharing == 1
        assert abs(est.capacity_fps - 130) < 1e-6 and abs(est.predicted_fps - 35) < 1e-6
        assert room(s.worker, limits, s.t).state == READY

    def test_unmarked_live_streams_make_the_estimate_conservative(self) -> None:
        """Cameras the balancer did not start (e.g. before a restart) count as file streams: the
        estimate can only be too low, never too high."""
        s = Streams(130)
        s.add(live=True, mark_live=False)
        s.add()
        s.run(6)
        s.poll()
        s.settle(2)
        est = s.worker.estimate()
        assert est is not None and abs(est.capacity_fps - 130) < 1e-6
        assert est.predicted_fps < (130 - 30) / 2

    def test_noise_and_whole_frames_average_out_over_the_window(self) -> None:
        """Rates off by up to 2% per second and avg_fps from whole frames: within 1% over the window."""
        import random

        rng = random.Random(7)
        s = Streams(700)
        for _ in range(22):
            s.add()
        s.run(6)
        s.poll()
        for _ in range(int(CAPACITY_WINDOW) + 2):
            s.run(1.0, factor=rng.uniform(0.98, 1.02))  # one factor for all streams: the worst case
            s.poll(whole_frames=True)
        est = s.worker.estimate()
        assert est is not None and abs(est.capacity_fps - 700) / 700 < 0.01
        assert est.predicted_fps > 30  # 700/23 = 30.4: the 23rd start is still admitted

    def test_backends_show_capacity_and_prediction(self) -> None:
        s = Streams(100)
        for _ in range(2):
            s.add()
        s.run(6)
        s.poll()
        s.settle(2)
        pool = WorkerPool(PREDICTIVE, 15, lambda: s.t)
        pool._workers["w"] = s.worker
        w = pool.to_dict()["workers"][0]
        assert (w["capacity_fps"], w["capacity_streams"], w["predicted_fps"]) == (100.0, 2, 33.33)
        assert w["capacity_age"] == 0.0 and w["instances"][0]["live"] is False


def density(capacity: float, target: float, noise: float = 0.0, seed: int = 0) -> tuple[int, float]:
    """Starts one after another on one worker, each once visible and measured, until refused.

    Returns how many were admitted and the slowest stream's rate after settling.
    """
    import random

    rng = random.Random(seed)
    s = Streams(capacity)
    clock = [s.t]
    pool = WorkerPool(Limits(target_fps=target, warmup=1, predictive=True, stale_after=1e9), 15, lambda: clock[0])
    pool._workers["w"] = s.worker
    pool.observe(s.worker, [])
    for admitted in range(1000):
        clock[0] = s.t
        ticket = pool.pick()
        if not isinstance(ticket, Ticket):
            return admitted, min(s.rates().values())
        instance_id = s.add()
        pool.confirm(ticket, instance_id)
        for _ in range(3):  # visible, then past the 1 s warm-up over clean windows
            s.run(1.0, factor=rng.uniform(1 - noise, 1 + noise))
            clock[0] = s.t
            entries = [StatusEntry(i, "RUNNING", s.frames[i] / (s.t - t0), s.t - t0) for i, t0 in s.started.items()]
            pool.observe(s.worker, entries)
    raise AssertionError("never refused")


def theoretical_max(capacity: float, target: float) -> int:
    """Most file streams whose fair share stays above target (at least 1: an unmeasured worker gets one)."""
    n = 1
    while capacity / (n + 1) > target:
        n += 1
    return n


def test_stream_density_benchmark_figures() -> None:
    """The benchmark's workers: 130 → 4, 700 → 23 (4 + 4 + 23 = 31), and the e2e test's 100 → 3."""
    assert [density(c, 30)[0] for c in (130, 130, 700, 100)] == [4, 4, 23, 3]
    assert all(density(c, 30)[1] > 30 for c in (130, 700, 100))


@settings(max_examples=60, deadline=None)
@given(capacity=st.floats(20, 600), target=st.floats(5, 60), noise=st.sampled_from([0.0, 0.01]),
       seed=st.integers(0, 10))
def test_predictive_admits_exactly_the_theoretical_max(capacity: float, target: float, noise: float,
                                                       seed: int) -> None:
    """Sequential starts stop at the largest n with capacity/n > target; no stream ends below target.
    Noise must not decide it, so values within noise of the boundary are left out."""
    n = theoretical_max(capacity, target)
    margin = 3 * noise + 1e-9
    assume(abs(capacity / n - target) > margin * target or n == 1)
    assume(abs(capacity / (n + 1) - target) > margin * target)
    admitted, slowest = density(capacity, target, noise, seed)
    assert admitted == n
    if capacity > target:
        assert slowest > target


# ---- strategies ----------------------------------------------------------------------------------
def loaded(name: str, n: int, capacity: float | None = None, **spec: object) -> Worker:
    """A worker with n warmed-up file streams; with ``capacity``, measured over a clean window."""
    w = Worker(WorkerSpec(key=name, name=name, url=f"http://{name}", **spec))  # type: ignore[arg-type]
    rate = (capacity or 30.0 * max(n, 1)) / max(n, 1)
    ids = [f"{k:020x}{abs(hash(name)) % 10**12:012d}" for k in range(n)]
    for t in (90.0, 95.0, 100.0):
        w.observe([StatusEntry(i, "RUNNING", rate, t - 80.0) for i in ids], t, pending_timeout=15)
    if capacity is None:
        w.capacity = None
    return w


class TestStrategies:
    def test_least_pipelines_takes_the_least_loaded_with_room(self) -> None:
        workers = [loaded("a", 3), loaded("b", 1), loaded("c", 0), loaded("d", 0)]
        limits = Limits(max_running=4, stale_after=1e9)
        assert choose(workers, 0, limits, 100, strategy=LEAST_PIPELINES).worker is workers[2]
        assert choose(workers, 3, limits, 100, strategy=LEAST_PIPELINES).worker is workers[3]  # tie: from start
        workers[1].reservations[1] = Reservation(1, 100.0)
        workers[2].reservations[1] = Reservation(1, 100.0)
        assert choose(workers, 0, limits, 100, strategy=LEAST_PIPELINES).worker is workers[3]

    def test_most_headroom_prefers_idle_then_fastest_prediction(self) -> None:
        small, big, idle = loaded("small", 2, capacity=130), loaded("big", 2, capacity=700), loaded("idle", 0)
        limits = Limits(stale_after=1e9)
        assert headroom(big) == (1, 700 / 3)
        assert choose([small, big], 0, limits, 100, strategy=MOST_HEADROOM).worker is big
        assert choose([small, big, idle], 0, limits, 100, strategy=MOST_HEADROOM).worker is idle
        unmeasured = loaded("u", 1)
        assert headroom(unmeasured) == (0, -1.0)
        assert choose([unmeasured, small], 0, limits, 100, strategy=MOST_HEADROOM).worker is small

    def test_pool_uses_its_strategy(self) -> None:
        pool = WorkerPool(Limits(stale_after=1e9), 15, lambda: 100.0, strategy=LEAST_PIPELINES)
        for name, n in (("a", 2), ("b", 0)):
            w = loaded(name, n)
            pool._workers[name] = w
        picks = []
        for _ in range(3):
            ticket = pool.pick()
            assert isinstance(ticket, Ticket)
            picks.append(ticket.worker.name)
        assert picks == ["b", "b", "a"] or picks == ["b", "b", "b"]
        assert picks[:2] == ["b", "b"]


worker_loads = st.lists(st.tuples(st.integers(0, 6), st.sampled_from([None, 60.0, 130.0, 700.0]),
                                  st.sampled_from([None, "CPU", "GPU"])), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(specs=worker_loads, max_running=st.integers(0, 5), start=st.integers(0, 10),
       device=st.sampled_from([None, "CPU", "GPU"]), strategy=st.sampled_from([ROUND_ROBIN, LEAST_PIPELINES,
                                                                               MOST_HEADROOM]),
       excluded=st.sets(st.integers(0, 5)))
def test_every_strategy_picks_a_worker_with_room_in_the_pool(
    specs: list[tuple[int, float | None, str | None]], max_running: int, start: int, device: str | None,
    strategy: str, excluded: set[int],
) -> None:
    workers = [loaded(f"w{i}", n, cap, device=dev) for i, (n, cap, dev) in enumerate(specs)]
    limits = Limits(max_running=max_running, target_fps=30, warmup=5, predictive=True, stale_after=1e9)
    exclude = frozenset(f"w{i}" for i in excluded)
    eligible = [w for w in workers if w.key not in exclude and (device is None or w.spec.device in (None, device))]
    with_room = [w for w in eligible if room(w, limits, 100).has_room]
    choice = choose(workers, start, limits, 100, device, exclude, strategy)
    if not with_room:
        assert choice.worker is None and set(choice.passed) == {w.name for w in eligible}
        return
    chosen = choice.worker
    assert chosen in with_room and workers[choice.index] is chosen
    if strategy == LEAST_PIPELINES:  # never a worker with more load than another with room
        assert all(chosen.load <= w.load for w in with_room)
    if strategy == MOST_HEADROOM:
        assert all(headroom(chosen) >= headroom(w) for w in with_room)


@settings(max_examples=150, deadline=None)
@given(active=st.lists(st.integers(0, 6), min_size=1, max_size=6), max_running=st.integers(1, 5),
       burst=st.integers(0, 40), strategy=st.sampled_from([LEAST_PIPELINES, MOST_HEADROOM]))
def test_no_strategy_admits_more_than_free_slots(active: list[int], max_running: int, burst: int,
                                                 strategy: str) -> None:
    pool = make_pool(active, max_running)
    pool.strategy = strategy
    free = sum(max(0, max_running - n) for n in active)
    admitted = 0
    for i in range(burst):
        ticket = pool.pick()
        if isinstance(ticket, Ticket):
            pool.confirm(ticket, f"{i:032x}")
            admitted += 1
    assert admitted == min(free, burst)
    assert all(w.load <= max(max_running, w.active) for w in pool.workers())


# ---- device pools and fallback --------------------------------------------------------------------
def device_pool(fallback: dict[str, str] | None = None, max_running: int = 1) -> WorkerPool:
    pool = WorkerPool(Limits(max_running=max_running), 15, lambda: 100.0, fallback=fallback)
    for name, device in (("g1", "GPU"), ("g2", "GPU"), ("c1", "CPU")):
        pool.upsert_worker(WorkerSpec(name, name, f"http://{name}", device=device))
        pool.observe(pool.workers()[-1], [])
    return pool


class TestDevicePools:
    def test_round_robin_within_the_pool_and_503_names_it(self) -> None:
        pool = device_pool(max_running=2)
        picks = [pool.pick("GPU") for _ in range(5)]
        names = [p.worker.name for p in picks if isinstance(p, Ticket)]
        assert names == ["g1", "g2", "g1", "g2"]
        refused = picks[-1]
        assert isinstance(refused, Choice) and refused.fallback is None
        assert set(refused.passed) == {"g1", "g2"}  # the CPU worker is not in the GPU pool

    def test_fallback_takes_the_other_pool_only_when_full(self) -> None:
        pool = device_pool({"GPU": "CPU"})
        first = [pool.pick("GPU") for _ in range(2)]
        assert all(isinstance(t, Ticket) and t.fallback is None and t.worker.spec.device == "GPU" for t in first)
        moved = pool.pick("GPU")
        assert isinstance(moved, Ticket) and moved.worker.name == "c1" and moved.fallback == "CPU"
        refused = pool.pick("GPU")
        assert isinstance(refused, Choice) and refused.fallback == "CPU"
        assert set(refused.passed) == {"g1", "g2", "c1"}

    def test_no_fallback_the_other_way_unless_asked(self) -> None:
        pool = device_pool({"GPU": "CPU"})
        assert isinstance(pool.pick("CPU"), Ticket)
        refused = pool.pick("CPU")
        assert isinstance(refused, Choice) and refused.fallback is None and set(refused.passed) == {"c1"}

    def test_unknown_device_workers_are_tried_once(self) -> None:
        pool = device_pool({"GPU": "CPU"})
        pool.upsert_worker(WorkerSpec("x", "x", "http://x"))
        pool.observe(pool.get("x"), [])  # type: ignore[arg-type]
        names = [t.worker.name for t in (pool.pick("GPU") for _ in range(4)) if isinstance(t, Ticket)]
        assert names == ["g1", "g2", "x", "c1"]

    def test_retarget_device_rewrites_only_device_parameters(self) -> None:
        body = json.dumps({"source": {"uri": "file:///gpu.mp4", "type": "uri"},
                           "parameters": {"detection-device": "GPU", "classification-device": "MULTI:GPU,CPU",
                                          "inference-interval": 1, "detection-model-instance-id": "GPU-1x"}})
        out = json.loads(retarget_device(body.encode(), "GPU", "CPU"))
        assert out["parameters"] == {"detection-device": "CPU", "classification-device": "CPU",
                                     "inference-interval": 1, "detection-model-instance-id": "GPU-1x"}
        assert out["source"] == {"uri": "file:///gpu.mp4", "type": "uri"}


def test_live_source() -> None:
    assert not live_source(json.dumps({"source": {"uri": "file:///v.mp4", "type": "uri"}}).encode())
    assert not live_source(json.dumps({"source": {"uri": "https://x/rtsp.mp4", "type": "uri"}}).encode())
    assert live_source(json.dumps({"source": {"uri": "rtsp://cam/1", "type": "uri"}}).encode())
    assert live_source(json.dumps({"source": {"uri": "RTSP://cam/1", "type": "uri"}}).encode())
    assert live_source(json.dumps({"source": {"device": "/dev/video0", "type": "webcam"}}).encode())
    assert live_source(json.dumps({"source": {"element": "v4l2src", "type": "gst"}}).encode())
    assert not live_source(b"{not json gst")
    assert not live_source(b'["gst"]')
