"""Leader election, pure: the Lease state machine with the clock passed in, no sockets.

``now`` is the replica's monotonic clock; ``wall`` only goes into the Lease's timestamps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.cli import build_parser, serve_overrides
from balancer.config import ConfigError, load_config
from balancer.leader import (
    CANDIDATE_JITTER,
    Create,
    Election,
    LeaseRecord,
    Update,
    Wait,
    format_micro_time,
    parse_micro_time,
    resolve_identity,
)

D, R, P = 15, 10.0, 2.0  # lease duration, renew deadline, retry period: the defaults
WALL = 1_800_000_000.0


def election(identity: str = "a", d: int = D, r: float = R, p: float = P) -> Election:
    return Election(identity, d, r, p)


def held_by(holder: str, rv: str = "7", transitions: int = 3, renew: float | None = WALL) -> LeaseRecord:
    return LeaseRecord(holder, D, WALL - 100, renew, transitions, rv)


def won(e: Election, action: Any, now: float, rv: str) -> bool:
    """The API server accepted ``action``: it answers the record with a new version."""
    assert isinstance(action, Create | Update), action
    return e.succeeded(action, replace(action.record, resource_version=rv), now)


# ---- acquiring ---------------------------------------------------------------------------------------


def test_no_lease_creates_one_naming_us_and_leads_until_the_renew_deadline() -> None:
    e = election()
    action = e.decide(None, now=50.0, wall=WALL)
    assert action == Create(LeaseRecord("a", D, WALL, WALL, 0, ""), sent_at=50.0)
    assert not e.is_leader(50.0)  # not before the API server said yes
    assert won(e, action, now=50.2, rv="1") is True
    assert e.is_leader(50.2) and e.terms == 1 and e.holder == "a"
    # leadership counts from when the write was sent, not from when the answer came
    assert e.is_leader(50.0 + R - 0.001) and not e.is_leader(50.0 + R)


def test_a_held_lease_is_taken_over_only_after_its_duration_by_our_own_clock() -> None:
    e = election()
    ancient = held_by("b", renew=WALL - 10_000)  # its renewTime says "long expired": ignored, another clock
    assert e.decide(ancient, now=100.0, wall=WALL) == Wait("lease held by b")
    assert e.expires_at() == 100.0 + D
    assert isinstance(e.decide(ancient, now=100.0 + D - 0.01, wall=WALL), Wait)
    action = e.decide(ancient, now=100.0 + D, wall=WALL + 15)
    assert action == Update(LeaseRecord("a", D, WALL + 15, WALL + 15, 4, "7"), sent_at=100.0 + D)
    assert won(e, action, now=115.1, rv="8") and e.is_leader(115.1)


def test_every_new_version_of_the_lease_restarts_the_wait() -> None:
    e = election()
    e.decide(held_by("b", rv="7"), now=0.0, wall=WALL)
    assert isinstance(e.decide(held_by("b", rv="7"), now=10.0, wall=WALL), Wait)  # same version: clock runs on
    e.decide(held_by("b", rv="9", renew=WALL + 10), now=12.0, wall=WALL)  # b renewed
    assert isinstance(e.decide(held_by("b", rv="9", renew=WALL + 10), now=D + 1.0, wall=WALL), Wait)
    assert e.expires_at() == 12.0 + D
    assert isinstance(e.decide(held_by("b", rv="9", renew=WALL + 10), now=12.0 + D, wall=WALL), Update)


def test_a_free_or_released_lease_is_taken_at_once() -> None:
    e = election()
    e.decide(held_by("b", rv="7"), now=0.0, wall=WALL)
    released = LeaseRecord("", 1, WALL, WALL, 3, "8")
    action = e.decide(released, now=0.5, wall=WALL + 1)
    assert isinstance(action, Update)
    assert (action.record.holder, action.record.transitions, action.record.resource_version) == ("a", 4, "8")
    assert action.record.duration == D  # our duration, not the released lease's 1 s


def test_a_lease_naming_us_after_a_restart_is_renewed_at_once_keeping_its_history() -> None:
    e = election()  # a new process with the same identity (pod name): the API server still names us
    action = e.decide(held_by("a", rv="5"), now=0.0, wall=WALL)
    assert action == Update(LeaseRecord("a", D, WALL - 100, WALL, 3, "5"), sent_at=0.0)
    assert won(e, action, now=0.1, rv="6") and e.terms == 1


# ---- leading ------------------------------------------------------------------------------------------


def lead(e: Election, now: float = 0.0) -> LeaseRecord:
    """Make ``e`` the leader at ``now``; the Lease as stored."""
    action = e.decide(None, now, WALL)
    assert won(e, action, now, "1")
    assert e.observed is not None
    return e.observed


def test_the_leader_renews_keeping_acquire_time_and_transitions() -> None:
    e = election()
    stored = lead(e)
    action = e.decide(stored, now=P, wall=WALL + P)
    assert action == Update(replace(stored, renew_time=WALL + P), sent_at=P)
    assert won(e, action, now=P + 0.01, rv="2") is False  # still the same term
    assert e.terms == 1 and e.is_leader(P + R - 0.01) and not e.is_leader(P + R)


def test_the_leader_steps_down_when_it_cannot_renew_before_the_deadline() -> None:
    e = election()
    stored = lead(e)
    for now in (2.0, 4.0, 6.0, 8.0):  # every renewal fails (API server down): nothing is reported
        e.decide(stored, now=now, wall=WALL + now)
        assert e.is_leader(now)
    assert e.is_leader(R - 0.001) and not e.is_leader(R)
    # The API server is back and still names us (nobody could take it: same version): we lead again.
    action = e.decide(stored, now=11.0, wall=WALL + 11)
    assert isinstance(action, Update) and won(e, action, now=11.1, rv="2") is True
    assert e.terms == 2


def test_a_conflict_on_renewal_steps_down_at_once() -> None:
    e = election()
    stored = lead(e)
    e.decide(stored, now=2.0, wall=WALL)
    e.conflict(now=2.1)  # someone else wrote in between
    assert not e.is_leader(2.1)


def test_seeing_another_holder_steps_down_at_once() -> None:
    e = election()
    lead(e)
    assert e.decide(held_by("b", rv="9"), now=1.0, wall=WALL) == Wait("lease held by b")
    assert not e.is_leader(1.0) and e.holder == "b"


def test_a_deleted_lease_steps_down_and_is_created_again() -> None:
    e = election()
    lead(e)
    assert isinstance(e.decide(None, now=1.0, wall=WALL), Create)
    assert not e.is_leader(1.0)


def test_an_answer_after_the_renew_deadline_does_not_make_a_leader() -> None:
    e = election()
    action = e.decide(None, now=0.0, wall=WALL)
    assert won(e, action, now=R + 1, rv="1") is False and not e.is_leader(R + 1)


# ---- releasing -----------------------------------------------------------------------------------------


def test_release_stops_leading_before_the_write_and_clears_the_holder() -> None:
    e = election()
    stored = lead(e)
    action = e.release(now=3.0, wall=WALL + 3)
    assert not e.is_leader(3.0)  # before the write is even sent
    assert action == Update(replace(stored, holder="", duration=1, acquire_time=WALL + 3, renew_time=WALL + 3),
                            sent_at=3.0)
    assert action.record.transitions == stored.transitions and action.record.resource_version == "1"
    assert e.decide(stored, now=4.0, wall=WALL) == Wait("released")  # never campaigns again
    assert won(e, action, now=3.1, rv="2") is False and not e.is_leader(3.1)


def test_release_of_a_lease_we_do_not_hold_writes_nothing() -> None:
    e = election()
    e.decide(held_by("b"), now=0.0, wall=WALL)
    assert e.release(now=1.0, wall=WALL) is None
    fresh = held_by("a", rv="12")  # the fresh read of a second attempt names us
    assert election().release(now=1.0, wall=WALL, lease=fresh) is not None


# ---- timing ---------------------------------------------------------------------------------------------


def test_a_candidate_wakes_up_right_when_the_lease_expires() -> None:
    e = election()
    e.decide(held_by("b"), now=0.0, wall=WALL)
    assert e.next_delay(0.0, jitter=0.0) == P
    assert e.next_delay(0.0, jitter=0.999) == pytest.approx(P * (1 + CANDIDATE_JITTER * 0.999))
    assert e.next_delay(D - 0.5, jitter=0.5) == pytest.approx(0.501)
    lead(e, now=20.0)
    assert e.next_delay(20.0, jitter=0.9) == P


def test_settings_must_leave_room_for_renewals() -> None:
    for d, r, p in [(10, 10.0, 2.0), (15, 10.0, 10.0), (15, 10.0, 0.0)]:
        with pytest.raises(ValueError):
            Election("a", d, r, p)
    with pytest.raises(ValueError):
        Election("", D, R, P)


# ---- the Lease on the wire ---------------------------------------------------------------------------------


def test_lease_objects_round_trip_with_micro_time() -> None:
    record = LeaseRecord("pod-a", 15, 1_795_874_954.5, 1_795_874_960.123456, 2, "",
                         {"name": "x", "labels": {"app": "b"}, "managedFields": [{}], "resourceVersion": "3"})
    obj = record.to_object("pipeline-balancer", "ns")
    assert obj["apiVersion"] == "coordination.k8s.io/v1" and obj["kind"] == "Lease"
    assert obj["metadata"] == {"name": "pipeline-balancer", "namespace": "ns", "labels": {"app": "b"}}
    spec = obj["spec"]
    assert spec == {"holderIdentity": "pod-a", "leaseDurationSeconds": 15, "leaseTransitions": 2,
                    "acquireTime": "2026-11-28T14:09:14.500000Z", "renewTime": "2026-11-28T14:09:20.123456Z"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", format_micro_time(0.0))
    back = LeaseRecord.from_object({**obj, "metadata": {**obj["metadata"], "resourceVersion": "9"}})
    assert back == replace(record, resource_version="9")
    assert replace(record, resource_version="9").to_object("l", "ns")["metadata"]["resourceVersion"] == "9"


def test_lease_reading_is_lenient_about_times_and_missing_fields() -> None:
    assert parse_micro_time("2026-11-28T14:09:20Z") == 1_795_874_960.0
    assert parse_micro_time("2026-11-28T15:09:20.5+01:00") == 1_795_874_960.5
    assert parse_micro_time("yesterday") is None and parse_micro_time(None) is None
    empty = LeaseRecord.from_object({"metadata": {"name": "l", "resourceVersion": "4"}})
    assert (empty.holder, empty.duration, empty.renew_time, empty.resource_version) == ("", 0, None, "4")
    for bad in (None, [], {"spec": {}}, {"metadata": {}, "spec": [1]}):
        with pytest.raises(ValueError):
            LeaseRecord.from_object(bad)


def test_identity_defaults_to_host_and_process() -> None:
    assert resolve_identity("balancer-7f9c") == "balancer-7f9c"
    assert resolve_identity("").endswith(f"-{__import__('os').getpid()}")


# ---- configuration -------------------------------------------------------------------------------------------


def test_ha_settings_defaults_environment_and_option() -> None:
    ha = load_config(env={"WORKERS": "http://w:8080"}).ha
    assert (ha.enabled, ha.lease_name, ha.lease_duration, ha.renew_deadline, ha.retry_period, ha.identity) == (
        False, "pipeline-balancer", 15, 10.0, 2.0, "")
    env = {"DISCOVERY": "kubernetes", "HA_ENABLED": "true", "POD_NAME": "balancer-x", "HA_LEASE_DURATION": "3",
           "HA_RENEW_DEADLINE": "2", "HA_RETRY_PERIOD": "0.5", "HA_LEASE_NAME": "lb"}
    ha = load_config(env=env).ha
    assert (ha.enabled, ha.identity, ha.lease_duration, ha.renew_deadline, ha.retry_period, ha.lease_name) == (
        True, "balancer-x", 3, 2.0, 0.5, "lb")
    args = build_parser().parse_args(["serve", "--kubernetes", "--ha"])
    assert load_config(env={}, overrides=serve_overrides(args)).ha.enabled
    assert not load_config(env={}, overrides=serve_overrides(build_parser().parse_args(["serve", "--kubernetes"]))
                           ).ha.enabled


@pytest.mark.parametrize(("env", "message"), [
    ({"DISCOVERY": "static", "WORKERS": "http://w:8080", "HA_ENABLED": "1"}, "ha.enabled needs Kubernetes discovery"),
    ({"HA_RENEW_DEADLINE": "15"}, "ha.renew_deadline must be shorter than ha.lease_duration"),
    ({"HA_RETRY_PERIOD": "10"}, "ha.retry_period must be shorter than ha.renew_deadline"),
    ({"HA_LEASE_NAME": "Not_A_Name"}, "is not a Kubernetes object name"),
    ({"HA_LEASE_DURATION": "1.5"}, "is not an integer"),
])
def test_bad_ha_settings_are_refused_at_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={"DISCOVERY": "kubernetes", **env})


# ---- at most one leader: simulated candidates on one store ------------------------------------------------


@dataclass
class Store:
    """An API server's Lease: versions and compare-and-swap, nothing else."""

    rv: int = 0
    lease: LeaseRecord | None = None

    def write(self, action: Create | Update) -> LeaseRecord | str:
        if isinstance(action, Create) and self.lease is not None:
            return "conflict"  # AlreadyExists
        if isinstance(action, Update):
            if self.lease is None:
                return "error"  # NotFound
            if action.record.resource_version != self.lease.resource_version:
                return "conflict"
        self.rv += 1
        self.lease = replace(action.record, resource_version=str(self.rv))
        return self.lease


@dataclass
class Candidate:
    election: Election
    rate: float
    offset: float
    wall_offset: float
    phase: tuple[Any, ...] = ("idle",)
    log: list[str] = field(default_factory=list)

    def now(self, t: float) -> float:
        return self.offset + self.rate * t

    def wall(self, t: float) -> float:
        return WALL + self.wall_offset + t  # wall clocks disagree by minutes: must not matter


IDLE, READ, WRITE, ANSWER = "idle", "read", "write", "answer"
NORMAL, LOSE_ANSWER, LOSE_REQUEST, RELEASE = range(4)
SIM_D, SIM_R, SIM_P = 3, 2.0, 0.5
MAX_SKEW = 0.1
"""Clock rates differ by at most 10%: safe while R·(1+s)/(1-s) < D, here 2.44 < 3."""


def step(c: Candidate, store: Store, t: float, op: int) -> None:
    """Advance one candidate by one phase of read → decide → write → answer."""
    e, now = c.election, c.now(t)
    kind = c.phase[0]
    if kind == IDLE:
        if op == RELEASE and not e.released:
            action = e.release(now, c.wall(t))
            c.phase = (WRITE, action) if action is not None else (IDLE,)
        elif not e.released:
            c.phase = (READ, store.lease)  # the answer travels; it is decided on later
    elif kind == READ:
        action = e.decide(c.phase[1], now, c.wall(t))
        c.phase = (IDLE,) if isinstance(action, Wait) else (WRITE, action)
    elif kind == WRITE:
        outcome: LeaseRecord | str = "error" if op == LOSE_REQUEST else store.write(c.phase[1])
        if op == LOSE_ANSWER and isinstance(outcome, LeaseRecord):
            outcome = "error"  # applied, but the client saw a timeout
        c.phase = (ANSWER, c.phase[1], outcome)
    else:
        _, action, outcome = c.phase
        if isinstance(outcome, LeaseRecord):
            e.succeeded(action, outcome, now)
        elif outcome == "conflict":
            e.conflict(now)
        c.phase = (IDLE,)


def check_one_leader(cands: list[Candidate], store: Store, t: float) -> str | None:
    leaders = [c.election.identity for c in cands if c.election.is_leader(c.now(t))]
    assert len(leaders) <= 1, f"two leaders at t={t}: {leaders}"
    if leaders:  # and the API server agrees
        assert store.lease is not None and store.lease.holder == leaders[0]
    return leaders[0] if leaders else None


def candidates(rates: list[float], offsets: list[float]) -> list[Candidate]:
    return [Candidate(Election(f"c{i}", SIM_D, SIM_R, SIM_P), rate, off, wall_off)
            for i, (rate, off, wall_off) in enumerate(zip(rates, offsets, [-300.0, 0.0, 170.0, 45.0], strict=False))]


def simulate(rates: list[float], offsets: list[float], weights: list[float], seed: int, n: int) -> list[str]:
    """A random schedule: every step advances time a little and one candidate by one phase, chosen by
    ``weights``; now and then one falls silent for a while (crashed, paused, partitioned), which is
    what lets another take over. Checks the invariant at every step; returns the leaders in turn."""
    rng = random.Random(seed)
    cands, store, t, leaders = candidates(rates, offsets), Store(), 0.0, []
    silent, silent_until = -1, 0.0
    for _ in range(n):
        t += rng.choice([0.0, 0.02, 0.1, 0.3, 0.6, 1.0, 1.5])
        check_one_leader(cands, store, t)  # time alone only ends leaderships
        if t >= silent_until and rng.random() < 0.01:
            silent, silent_until = rng.randrange(len(cands)), t + rng.uniform(0.5, 3 * SIM_D)
        awake = [i for i in range(len(cands)) if i != silent or t >= silent_until]
        who = rng.choices(awake, [weights[i] for i in awake])[0]
        step(cands[who], store, t, rng.choice([NORMAL] * 12 + [LOSE_ANSWER, LOSE_REQUEST]))
        leader = check_one_leader(cands, store, t)
        if leader and (not leaders or leaders[-1] != leader):
            leaders.append(leader)
    return leaders


@settings(max_examples=300, deadline=None)
@given(
    rates=st.lists(st.floats(1 - MAX_SKEW, 1 + MAX_SKEW), min_size=2, max_size=4),
    offsets=st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4),
    steps=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5, 4.0]),
                             st.sampled_from([NORMAL] * 6 + [LOSE_ANSWER, LOSE_REQUEST, RELEASE])),
                   max_size=150),
)
def test_at_most_one_leader_for_any_interleaving(rates: list[float], offsets: list[float],
                                                 steps: list[tuple[int, float, int]]) -> None:
    """Arbitrary interleavings of reads, decisions, writes and answers (some lost, some releases)."""
    cands, store, t = candidates(rates, offsets), Store(), 0.0
    for who, dt, op in steps:
        t += dt
        check_one_leader(cands, store, t)
        step(cands[who % len(cands)], store, t, op)
        check_one_leader(cands, store, t)


@settings(max_examples=150, deadline=None)
@given(
    rates=st.lists(st.floats(1 - MAX_SKEW, 1 + MAX_SKEW), min_size=2, max_size=4),
    offsets=st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4),
    weights=st.lists(st.floats(0.2, 1.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_at_most_one_leader_over_long_random_schedules(rates: list[float], offsets: list[float],
                                                       weights: list[float], seed: int) -> None:
    """Long runs with pauses, where takeovers and late answers actually happen."""
    simulate(rates, offsets, weights, seed, 1500)


def test_the_simulation_does_hand_leadership_around() -> None:
    """The properties above are not vacuous: leaders come and go, each safely."""
    leaders = simulate([0.9, 1.1, 1.0], [0.0, 500.0, -20.0], [1.0, 1.0, 1.0], seed=7, n=20_000)
    assert len(leaders) > 20 and set(leaders) == {"c0", "c1", "c2"}
