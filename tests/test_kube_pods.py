"""Unit tests of the pure discovery parts: selectors, pod → WorkerSpec, the event table, backoff, framing."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import ConfigError, DiscoverySettings
from balancer.discovery import make_discovery
from balancer.discovery.base import WorkerSpec
from balancer.discovery.kubernetes import KubernetesDiscovery, resolve_namespace
from balancer.discovery.pods import (
    Backoff,
    BadEvent,
    LineBuffer,
    PodTable,
    Remove,
    ResourceExpired,
    Upsert,
    WatchError,
    parse_selector,
    pod_to_spec,
    selector_matches,
    selector_problem,
)
from balancer.discovery.static import StaticDiscovery

SETTINGS = DiscoverySettings(source="kubernetes", namespace="ns")


def pod(name: str = "w1", uid: str = "u1", ip: str | None = "10.1.0.5", ready: bool = True,
        labels: dict[str, str] | None = None, deleting: bool = False, rv: str = "7", node: str = "n1",
        owner: str | None = None, phase: str = "Running") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid, "namespace": "ns", "resourceVersion": rv,
                            "labels": {"app": "pipeline-server"} if labels is None else labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if owner:
        meta["ownerReferences"] = [{"kind": "DaemonSet", "name": owner}]
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"kind": "Pod", "metadata": meta, "spec": {"nodeName": node}, "status": status}


# -- selectors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("", {}, True),
    ("app=pipeline-server", {"app": "pipeline-server"}, True),
    ("app==pipeline-server", {"app": "pipeline-server"}, True),
    ("app=pipeline-server", {"app": "other"}, False),
    ("app=pipeline-server", {}, False),
    ("app!=x", {"app": "y"}, True),
    ("app!=x", {}, True),  # Kubernetes: != also selects objects without the label
    ("app!=x", {"app": "x"}, False),
    ("tier in (cpu, gpu)", {"tier": "gpu"}, True),
    ("tier in (cpu,gpu)", {"tier": "npu"}, False),
    ("tier in (cpu,gpu)", {}, False),
    ("tier notin (cpu,gpu)", {"tier": "npu"}, True),
    ("tier notin (cpu,gpu)", {}, True),
    ("tier notin (cpu,gpu)", {"tier": "cpu"}, False),
    ("tier", {"tier": ""}, True),
    ("tier", {}, False),
    ("!tier", {}, True),
    ("!tier", {"tier": "x"}, False),
    ("app=pipeline-server,tier in (a,b),!canary", {"app": "pipeline-server", "tier": "b"}, True),
    ("app=pipeline-server,tier in (a,b),!canary", {"app": "pipeline-server", "tier": "b", "canary": "1"}, False),
    ("example.com/role=worker", {"example.com/role": "worker"}, True),
    ("app=", {"app": ""}, True),
])
def test_selector_matches(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(labels, selector) is expected


@pytest.mark.parametrize("bad", ["app=a b", "tier in (a", "tier in a,b)", "a,,b", "=x", "tier in ()", "a=b,"])
def test_bad_selectors_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid label selector"):
        parse_selector(bad)
    assert selector_problem(bad)
    assert selector_problem("app=pipeline-server") is None


def test_bad_selector_fails_at_start_up() -> None:
    with pytest.raises(ConfigError, match="selector"):
        make_discovery(DiscoverySettings(source="kubernetes", selector="app in (x"))


def test_make_discovery_picks_the_source() -> None:
    assert isinstance(make_discovery(DiscoverySettings(workers=("http://127.0.0.1:1",))), StaticDiscovery)
    assert isinstance(make_discovery(DiscoverySettings(source="kubernetes", namespace="x")), KubernetesDiscovery)


def test_namespace_comes_from_config_then_service_account_then_default(tmp_path: Path) -> None:
    assert resolve_namespace("mine", tmp_path) == "mine"
    assert resolve_namespace("", tmp_path) == "pipeline-server"
    (tmp_path / "namespace").write_text("workers\n")
    assert resolve_namespace("", tmp_path) == "workers"


# -- pod → spec ------------------------------------------------------------------------------------------

def test_ready_pod_is_routable() -> None:
    spec = pod_to_spec(pod(), SETTINGS)
    assert spec == WorkerSpec(key="w1/u1", name="w1", url="http://10.1.0.5:8080", routable=True,
                              terminating=False, device=None, node="n1", reason="")
    assert spec is not None and spec.labels == {"app": "pipeline-server"}


@pytest.mark.parametrize(("kwargs", "reason", "terminating"), [
    ({"ip": None, "ready": False}, "no pod IP", False),
    ({"ready": False}, "not ready", False),
    ({"deleting": True}, "terminating", True),  # even while still Ready
    ({"deleting": True, "ready": False}, "terminating", True),
    ({"phase": "Failed", "ready": False}, "pod failed", False),
])
def test_unroutable_pods_say_why(kwargs: dict[str, Any], reason: str, terminating: bool) -> None:
    spec = pod_to_spec(pod(**kwargs), SETTINGS)
    assert spec is not None
    assert (spec.routable, spec.reason, spec.terminating) == (False, reason, terminating)


def test_terminating_pod_keeps_its_address() -> None:
    spec = pod_to_spec(pod(deleting=True), SETTINGS)
    assert spec is not None and spec.url == "http://10.1.0.5:8080"


def test_no_ready_condition_is_not_ready() -> None:
    p = pod()
    p["status"]["conditions"] = []
    spec = pod_to_spec(p, SETTINGS)
    assert spec is not None and spec.reason == "not ready"


def test_port_ipv6_and_outside_selector() -> None:
    settings_ = DiscoverySettings(source="kubernetes", worker_port=9000, selector="app=x")
    assert pod_to_spec(pod(), settings_) is None
    spec = pod_to_spec(pod(ip="fd00::5", labels={"app": "x"}), settings_)
    assert spec is not None and spec.url == "http://[fd00::5]:9000"


def test_malformed_pod_is_not_a_worker() -> None:
    assert pod_to_spec({"metadata": {"name": "x"}}, SETTINGS) is None
    assert pod_to_spec({}, SETTINGS) is None


@pytest.mark.parametrize(("kwargs", "device"), [
    ({"labels": {"app": "pipeline-server", "device": "gpu"}}, "GPU"),
    ({"labels": {"app": "pipeline-server", "device": "CPU"}}, "CPU"),
    ({"owner": "pipeline-server-gpu-worker"}, "GPU"),
    ({"name": "pipeline-server-cpu-worker-x7k2p"}, "CPU"),
    ({"labels": {"app": "pipeline-server", "device": "npu"}, "name": "pipeline-server-gpu-worker-a"}, "GPU"),
    ({"labels": {"app": "pipeline-server", "device": "GPU"}, "name": "pipeline-server-cpu-worker-a"}, "GPU"),
    ({}, None),
])
def test_device_from_label_then_owner_then_name(kwargs: dict[str, Any], device: str | None) -> None:
    spec = pod_to_spec(pod(**kwargs), SETTINGS)
    assert spec is not None and spec.device == device


def test_device_label_is_configurable() -> None:
    settings_ = DiscoverySettings(source="kubernetes", device_label="accel")
    spec = pod_to_spec(pod(labels={"app": "pipeline-server", "accel": "Gpu", "device": "CPU"}), settings_)
    assert spec is not None and spec.device == "GPU"


# -- the table ---------------------------------------------------------------------------------------------

def pod_list(*pods: dict[str, Any], rv: str = "50") -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": list(pods)}


def test_replace_keeps_only_listed_matching_pods() -> None:
    table = PodTable(SETTINGS)
    table.apply({"type": "ADDED", "object": pod("old", "u0")})
    specs = table.replace(pod_list(pod("a", "ua"), pod("b", "ub", ready=False),
                                   pod("c", "uc", labels={"app": "other"}), rv="77"))
    assert sorted(s.key for s in specs) == ["a/ua", "b/ub"]
    assert sorted(table.workers) == ["a/ua", "b/ub"]
    assert table.resource_version == "77"


def test_events_become_changes_and_advance_the_version() -> None:
    table = PodTable(SETTINGS)
    table.replace(pod_list(rv="10"))
    added = table.apply({"type": "ADDED", "object": pod(ready=False, rv="11")})
    assert [type(c) for c in added] == [Upsert] and not added[0].spec.routable  # type: ignore[union-attr]
    assert table.resource_version == "11"
    ready = table.apply({"type": "MODIFIED", "object": pod(rv="12")})
    assert ready == [Upsert(pod_to_spec(pod(), SETTINGS))]  # type: ignore[arg-type]
    assert table.apply({"type": "MODIFIED", "object": pod(rv="13")}) == []  # nothing the pool sees changed
    assert table.resource_version == "13"
    term = table.apply({"type": "MODIFIED", "object": pod(deleting=True, rv="14")})
    assert term[0].spec.terminating  # type: ignore[union-attr]
    assert table.apply({"type": "DELETED", "object": pod(deleting=True, rv="15")}) == [Remove("w1/u1")]
    assert table.apply({"type": "DELETED", "object": pod(rv="16")}) == []  # unknown: nothing to say
    assert table.resource_version == "16" and table.workers == {}


def test_label_change_out_of_the_selector_removes_the_worker() -> None:
    table = PodTable(SETTINGS)
    table.apply({"type": "ADDED", "object": pod()})
    assert table.apply({"type": "MODIFIED", "object": pod(labels={"app": "other"})}) == [Remove("w1/u1")]
    # back in: a new worker again
    assert table.apply({"type": "MODIFIED", "object": pod()}) == [Upsert(pod_to_spec(pod(), SETTINGS))]  # type: ignore[arg-type]


def test_label_only_change_is_reported_for_display() -> None:
    table = PodTable(SETTINGS)
    table.apply({"type": "ADDED", "object": pod()})
    changes = table.apply({"type": "MODIFIED", "object": pod(labels={"app": "pipeline-server", "v": "2"})})
    assert len(changes) == 1 and changes[0].spec.labels["v"] == "2"  # type: ignore[union-attr]


def test_same_name_new_uid_replaces_the_old_worker_even_without_its_delete() -> None:
    table = PodTable(SETTINGS)
    table.apply({"type": "ADDED", "object": pod("w1", "old", ip="10.0.0.1")})
    changes = table.apply({"type": "ADDED", "object": pod("w1", "new", ip="10.0.0.2")})
    assert changes[0] == Remove("w1/old")
    assert isinstance(changes[1], Upsert) and changes[1].spec.url == "http://10.0.0.2:8080"
    assert list(table.workers) == ["w1/new"]


def test_bookmark_only_moves_the_version() -> None:
    table = PodTable(SETTINGS)
    table.apply({"type": "ADDED", "object": pod(rv="5")})
    assert table.apply({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "900"}}}) == []
    assert table.resource_version == "900" and len(table.workers) == 1


def test_error_events_raise() -> None:
    table = PodTable(SETTINGS)
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
    with pytest.raises(ResourceExpired) as info:
        table.apply(gone)
    assert info.value.code == 410
    with pytest.raises(WatchError) as other:
        table.apply({"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError"}})
    assert not isinstance(other.value, ResourceExpired)


@pytest.mark.parametrize("event", [
    {}, {"type": "ADDED"}, {"type": "ADDED", "object": "x"}, {"type": "WHAT", "object": pod()},
    {"type": "ADDED", "object": {"metadata": {"name": "x"}}}, {"type": "BOOKMARK", "object": {"metadata": {}}}, [1],
])
def test_garbage_is_a_bad_event(event: Any) -> None:
    with pytest.raises(BadEvent):
        PodTable(SETTINGS).apply(event)


# The invariant: whatever events arrive (even with some lost), the sink mirror equals the table,
# no pod name has two workers, and a re-list makes the table exactly the listed set.

NAMES = ["a", "b", "c"]
op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(NAMES), st.sampled_from([None, "10.0.0.1", "10.0.0.2"]),
              st.booleans(), st.booleans(), st.booleans()),  # ip, ready, labels match, new uid
    st.tuples(st.just("begin_delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("bookmark")),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(op, st.sampled_from([0, 0, 1, 2])), max_size=30))
def test_any_events_then_a_relist_give_exactly_the_listed_set(ops: list[tuple[tuple[Any, ...], int]]) -> None:
    """``lost``: 0 every event of the step arrives, 1 none does, 2 all but the first (a replaced
    pod's DELETED is lost, its successor's ADDED arrives)."""
    table = PodTable(SETTINGS)
    mirror: dict[str, WorkerSpec] = {}
    cluster: dict[str, dict[str, Any]] = {}
    uids = iter(range(10_000))
    rv = 0
    lost_any = False
    for (kind, *args), lost in ops:
        rv += 1
        events = []
        if kind == "put":
            name, ip, ready, match, fresh = args
            old = cluster.get(name)
            uid = f"u{next(uids)}" if fresh or old is None else old["metadata"]["uid"]
            if old is not None and uid != old["metadata"]["uid"]:
                del cluster[name]  # a new pod with that name: the old one is gone
                events.append(("DELETED", old))
            events.append(("MODIFIED" if name in cluster else "ADDED",
                           pod(name, uid, ip=ip, ready=ready, labels={"app": "pipeline-server" if match else "other"})))
            cluster[name] = events[-1][1]
        elif kind == "begin_delete" and args[0] in cluster:
            cluster[args[0]]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            events.append(("MODIFIED", cluster[args[0]]))
        elif kind == "delete" and args[0] in cluster:
            events.append(("DELETED", cluster.pop(args[0])))
        else:
            events.append(("BOOKMARK", {"metadata": {}}))
        for i, (event_type, obj) in enumerate(events):
            obj["metadata"]["resourceVersion"] = str(rv)
            if lost == 1 or (lost == 2 and i == 0 and len(events) > 1):
                lost_any = True
            else:
                _apply(table, mirror, {"type": event_type, "object": copy.deepcopy(obj)})
        if lost != 1:
            assert table.resource_version == str(rv)
        assert mirror == table.workers
        names = [s.name for s in table.workers.values()]
        assert len(names) == len(set(names))

    expected = {s.key: s for s in (pod_to_spec(p, SETTINGS) for p in cluster.values()) if s}
    if not lost_any:
        assert table.workers == expected
    specs = table.replace(pod_list(*cluster.values(), rv=str(rv + 1)))
    assert {s.key: s for s in specs} == expected == table.workers
    assert all(s.labels == expected[s.key].labels for s in specs)


def _apply(table: PodTable, mirror: dict[str, WorkerSpec], event: dict[str, Any]) -> None:
    for change in table.apply(event):
        if isinstance(change, Upsert):
            mirror[change.spec.key] = change.spec
        else:
            assert change.key in mirror  # never remove what the sink was never told about
            del mirror[change.key]


# -- backoff and framing --------------------------------------------------------------------------------

class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.8, 30.0, FixedRandom(0.0))
    assert [round(backoff.next(), 3) for _ in range(8)] == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    backoff.reset()
    assert backoff.next() == 0.8


def test_backoff_jitter_stays_within_a_quarter_below() -> None:
    low = Backoff(0.8, 30.0, FixedRandom(0.999999))
    assert [round(low.next(), 2) for _ in range(3)] == [0.6, 1.2, 2.4]
    rnd = Backoff(1.0, 8.0, random.Random(3))
    for base in [1, 2, 4, 8, 8, 8]:
        assert 0.75 * base <= rnd.next() <= base
    for _ in range(100):  # far past any float overflow
        rnd.next()
    assert rnd.next() <= 8.0


def test_line_buffer_reassembles_lines_across_chunks() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"a":') == []
    assert buf.pending
    assert buf.feed(b'1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert buf.feed(b":3}\n") == [b'{"c":3}']
    assert not buf.pending


def test_line_buffer_refuses_endless_lines() -> None:
    buf = LineBuffer(max_line=10)
    buf.feed(b"12345")
    with pytest.raises(BadEvent):
        buf.feed(b"678901")
