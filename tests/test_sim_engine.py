"""The simulated worker's pure engine, driven by a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.sim.engine import Engine, EngineSettings, SourceSpec, State, availability, fair_shares
from balancer.sim.ids import InstanceIds, parse_mac, random_mac
from tests.contract import check_status_entry, check_status_list

MAC = 0xAABBCCDDEEFF
T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def make(capacity: float = 130.0, max_running: int = 0, noise: float = 0.0, source_fps: float = 30.0,
         seed: int = 1) -> tuple[Engine, FakeClock]:
    clock = FakeClock()
    settings = EngineSettings(capacity_fps=capacity, source_fps=source_fps, noise=noise, max_running=max_running)
    return Engine(clock=clock, ids=InstanceIds(MAC), settings=settings, rng=random.Random(seed)), clock


def file_request(frames: int | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "uri", "uri": "file:///video.mp4"}
    if frames is not None:
        source["properties"] = {"sim-frames": frames}
    return {"source": source}


LIVE = {"source": {"type": "gst", "element": "videotestsrc"}}
RTSP = {"source": {"type": "uri", "uri": "rtsp://camera/stream"}}


def start(engine: Engine, request: dict[str, Any]) -> str:
    return engine.create("object_detection", "person_vehicle_bike", request).id


def status(engine: Engine, instance_id: str) -> dict[str, Any]:
    entry = engine.status(instance_id)
    assert entry is not None
    return check_status_entry(entry)


def test_one_file_stream_runs_at_full_capacity() -> None:
    engine, clock = make(capacity=130)
    a = start(engine, file_request())
    clock.tick(2.0)
    entry = status(engine, a)
    assert entry["state"] == "RUNNING"
    assert entry["start_time"] == T0
    assert entry["elapsed_time"] == pytest.approx(2.0)
    assert entry["avg_fps"] == pytest.approx(130.0)


@pytest.mark.parametrize(("streams", "fps"), [(1, 130.0), (4, 32.5), (5, 26.0), (13, 10.0)])
def test_file_streams_share_capacity_equally(streams: int, fps: float) -> None:
    engine, clock = make(capacity=130)
    ids = [start(engine, file_request()) for _ in range(streams)]
    clock.tick(4.0)
    for entry in check_status_list(engine.statuses()):
        assert entry["id"] in ids
        assert entry["avg_fps"] == pytest.approx(fps, abs=0.25)  # whole frames only


def test_rates_change_the_moment_the_running_set_changes() -> None:
    engine, clock = make(capacity=130)
    a = start(engine, file_request())
    clock.tick(1.0)  # a alone: 130 frames
    b = start(engine, file_request())
    clock.tick(1.0)  # both at 65
    assert status(engine, a)["avg_fps"] == pytest.approx((130 + 65) / 2)
    assert status(engine, b)["avg_fps"] == pytest.approx(65)
    engine.stop(b)
    clock.tick(1.0)  # a alone again
    assert status(engine, a)["avg_fps"] == pytest.approx((130 + 65 + 130) / 3)
    assert status(engine, b)["avg_fps"] == pytest.approx(65)
    assert status(engine, b)["elapsed_time"] == pytest.approx(1.0)


def test_live_sources_are_capped_and_leave_the_rest_to_files() -> None:
    engine, clock = make(capacity=130, source_fps=30)
    live = start(engine, LIVE)
    rtsp = start(engine, RTSP)
    file = start(engine, file_request())
    clock.tick(2.0)
    assert status(engine, live)["avg_fps"] == pytest.approx(30)
    assert status(engine, rtsp)["avg_fps"] == pytest.approx(30)
    assert status(engine, file)["avg_fps"] == pytest.approx(70)


def test_live_sources_below_their_rate_when_the_worker_is_short() -> None:
    engine, clock = make(capacity=40, source_fps=30)
    ids = [start(engine, LIVE) for _ in range(2)]
    clock.tick(1.0)
    assert [status(engine, i)["avg_fps"] for i in ids] == [pytest.approx(20), pytest.approx(20)]


def test_source_spec_from_request() -> None:
    assert SourceSpec.from_request(file_request()) == SourceSpec(live=False, frames=None)
    assert SourceSpec.from_request(file_request(300)) == SourceSpec(live=False, frames=300)
    assert SourceSpec.from_request(LIVE).live
    assert SourceSpec.from_request({"source": {"type": "webcam", "device": "/dev/video0"}}).live
    assert SourceSpec.from_request(RTSP).live
    assert not SourceSpec.from_request({"source": {"type": "uri", "uri": "https://x/y.mp4"}}).live
    assert SourceSpec.from_request(file_request(0)).frames is None
    assert SourceSpec.from_request({}) == SourceSpec()


def test_delete_answers_the_status_of_that_moment_then_aborts() -> None:
    engine, clock = make(capacity=100)
    a = start(engine, file_request())
    clock.tick(1.0)
    answer = engine.stop(a)
    assert answer is not None
    assert answer["state"] == "RUNNING"
    assert answer["avg_fps"] == pytest.approx(100)
    clock.tick(5.0)
    after = status(engine, a)
    assert after["state"] == "ABORTED"
    assert after["elapsed_time"] == pytest.approx(1.0)
    assert after["avg_fps"] == pytest.approx(100)
    again = engine.stop(a)
    assert again == after  # stopping a stopped instance changes nothing
    assert engine.stop("0" * 32) is None


def test_queued_beyond_max_running_and_started_when_a_slot_frees() -> None:
    engine, clock = make(capacity=120, max_running=2)
    a, b, c = (start(engine, file_request()) for _ in range(3))
    queued = status(engine, c)
    assert queued["state"] == "QUEUED"
    assert queued["avg_fps"] == 0 and queued["start_time"] is None and queued["elapsed_time"] is None
    clock.tick(1.0)
    assert status(engine, a)["avg_fps"] == pytest.approx(60)  # the queued one takes no capacity
    engine.stop(a)
    entry = status(engine, c)
    assert entry["state"] == "RUNNING"
    assert entry["start_time"] == pytest.approx(T0 + 1.0)
    clock.tick(1.0)
    assert status(engine, b)["avg_fps"] == pytest.approx(60)
    assert status(engine, c)["avg_fps"] == pytest.approx(60)


def test_deleting_a_queued_instance_aborts_it_at_once() -> None:
    engine, _ = make(max_running=1)
    start(engine, file_request())
    b = start(engine, file_request())
    answer = engine.stop(b)
    assert answer is not None
    assert answer["state"] == "ABORTED" and answer["start_time"] is None
    assert engine.queue == type(engine.queue)()


def test_finite_source_completes_on_its_exact_frame_and_frees_capacity() -> None:
    engine, clock = make(capacity=50)
    finite = start(engine, file_request(100))
    endless = start(engine, file_request())
    clock.tick(10.0)  # one big step: finite completes at t=4 (25 fps), endless then runs at 50
    done = status(engine, finite)
    assert done["state"] == "COMPLETED"
    assert done["elapsed_time"] == pytest.approx(4.0)
    assert done["avg_fps"] == pytest.approx(25.0)
    assert engine.instances[finite].frames == 100
    assert status(engine, endless)["avg_fps"] == pytest.approx((100 + 6 * 50) / 10)


def test_completion_starts_the_next_queued_instance_at_that_moment() -> None:
    engine, clock = make(capacity=10, max_running=1)
    finite = start(engine, file_request(20))
    queued = start(engine, file_request())
    clock.tick(5.0)
    assert status(engine, finite)["state"] == "COMPLETED"
    entry = status(engine, queued)
    assert entry["state"] == "RUNNING"
    assert entry["start_time"] == pytest.approx(T0 + 2.0)
    assert entry["avg_fps"] == pytest.approx(10)


def test_fail_sets_error_with_message_and_frees_the_slot() -> None:
    engine, clock = make(capacity=10, max_running=1)
    a = start(engine, file_request())
    b = start(engine, file_request())
    clock.tick(1.0)
    engine.fail(a, "broker unreachable")
    entry = status(engine, a)
    assert entry["state"] == "ERROR" and entry["message"] == "broker unreachable"
    assert status(engine, b)["state"] == "RUNNING"
    engine.fail(a, "again")  # no effect on a stopped instance
    assert status(engine, a)["message"] == "broker unreachable"


def test_status_list_keeps_every_instance_in_start_order() -> None:
    engine, clock = make()
    ids = [start(engine, file_request(5)) for _ in range(3)]
    clock.tick(60.0)
    entries = check_status_list(engine.statuses())
    assert [e["id"] for e in entries] == ids
    assert {e["state"] for e in entries} == {"COMPLETED"}


def test_latency_appears_once_a_frame_went_through() -> None:
    engine, clock = make(capacity=100)
    a = start(engine, file_request())
    assert "avg_pipeline_latency" not in status(engine, a)
    clock.tick(0.5)
    assert status(engine, a)["avg_pipeline_latency"] == pytest.approx(0.01)
    start(engine, file_request())
    clock.tick(0.5)
    assert status(engine, a)["avg_pipeline_latency"] == pytest.approx(0.02)
    engine.stop(a)
    clock.tick(0.5)
    assert status(engine, a)["avg_pipeline_latency"] == pytest.approx(0.02)  # frozen once stopped


def test_noise_stays_within_its_bounds_and_zero_noise_is_exact() -> None:
    engine, clock = make(capacity=100, noise=0.05, seed=7)
    ids = [start(engine, file_request()) for _ in range(2)]
    rates = set()
    for _ in range(200):
        clock.tick(0.1)
        engine.advance()
        for i in ids:
            rate = engine.instances[i].rate
            assert 50 * 0.95 <= rate <= 50 * 1.05
            rates.add(round(rate, 6))
    assert len(rates) > 10  # it does vary
    for i in ids:
        assert status(engine, i)["avg_fps"] == pytest.approx(50, rel=0.05)


def test_noise_never_lifts_a_live_source_above_its_rate() -> None:
    engine, clock = make(capacity=1000, noise=0.1)
    live = start(engine, LIVE)
    for _ in range(50):
        clock.tick(0.1)
        engine.advance()
        assert engine.instances[live].rate == 30


def test_states_are_the_real_names() -> None:
    assert [s.value for s in State] == ["QUEUED", "RUNNING", "COMPLETED", "ERROR", "ABORTED"]
    assert State.ABORTED.stopped and not State.QUEUED.stopped


@given(capacity=st.floats(1, 10_000),
       caps=st.lists(st.one_of(st.none(), st.floats(0.1, 500)), min_size=1, max_size=20))
def test_fair_shares_respect_caps_and_use_the_capacity(capacity: float, caps: list[float | None]) -> None:
    rates = fair_shares(capacity, caps)
    assert sum(rates) <= capacity * (1 + 1e-9)
    for rate, cap in zip(rates, caps, strict=True):
        assert rate >= 0
        if cap is not None:
            assert rate <= cap + 1e-9
    free = [r for r, c in zip(rates, caps, strict=True) if c is None]
    if free:
        assert sum(rates) == pytest.approx(capacity)
        assert max(free) == pytest.approx(min(free))
        assert all(r <= free[0] + 1e-9 for r in rates)


# ---- the seed's agent rule ------------------------------------------------------------
def entry(state: str, fps: float) -> dict[str, Any]:
    return {"state": state, "avg_fps": fps}


@pytest.mark.parametrize(("entries", "max_running", "target", "answer"), [
    ([], 0, 0, "100%"),
    ([], 2, 30, "100%"),
    ([entry("RUNNING", 50)], 2, 0, "100%"),
    ([entry("RUNNING", 50), entry("RUNNING", 50)], 2, 0, "0%"),
    ([entry("RUNNING", 50), entry("QUEUED", 0), entry("COMPLETED", 1)], 2, 0, "100%"),
    ([entry("RUNNING", 50), entry("RUNNING", 50)], 0, 0, "100%"),
    ([entry("RUNNING", 31)], 0, 30, "100%"),
    ([entry("RUNNING", 30)], 0, 30, "0%"),
    ([entry("RUNNING", 0)], 0, 30, "0%"),
    ([entry("ABORTED", 3)], 1, 30, "100%"),
])
def test_availability_rule(entries: list[dict[str, Any]], max_running: int, target: float, answer: str) -> None:
    assert availability(entries, max_running, target) == answer


# ---- ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-FF", "aabbccddeeff", " aabb.ccdd.eeff "])
def test_parse_mac_forms(text: str) -> None:
    assert parse_mac(text) == MAC


@pytest.mark.parametrize("text", ["", "aa:bb:cc:dd:ee", "zz:bb:cc:dd:ee:ff", "aabbccddeeff00"])
def test_parse_mac_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="MAC"):
        parse_mac(text)


def test_random_mac_is_unicast_and_locally_administered() -> None:
    rng = random.Random(3)
    macs = {random_mac(rng) for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = mac >> 40
        assert first & 0x02 and not first & 0x01
        assert 0 <= mac < 1 << 48


def test_instance_ids_are_uuid1_hex_ending_in_the_mac() -> None:
    ids = InstanceIds(MAC)
    made = [ids.new() for _ in range(100)]
    assert len(set(made)) == 100
    for value in made:
        assert len(value) == 32 and value == value.lower()
        assert value.endswith("aabbccddeeff")
        assert value[12] == "1"  # uuid version 1
