"""Contract tests of the Lease I/O: the real kubernetes_asyncio client (CoordinationV1Api), over HTTP,
against the fake API server's ``coordination.k8s.io/v1`` leases; then whole election loops on it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from balancer.config import HaSettings
from balancer.discovery.kubernetes import make_api_client
from balancer.leader import LeaderElector, LeaseApi, LeaseApiError, LeaseConflict, LeaseRecord
from tests.fakekube import FakeKube
from tests.test_kube_contract import eventually

pytestmark = pytest.mark.timeout(30)
NS, NAME = "pipeline-server", "pipeline-balancer"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    server = FakeKube(NS)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def api(kube: FakeKube, tmp_path: Path) -> AsyncIterator[LeaseApi]:
    client = await make_api_client(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    yield LeaseApi(client, NS, NAME, timeout=2.0)
    await client.close()


def record(holder: str, rv: str = "", transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, 15, 1_795_874_954.5, 1_795_874_960.25, transitions, rv)


async def test_create_read_replace_with_resource_versions(kube: FakeKube, api: LeaseApi) -> None:
    assert await api.get() is None  # 404 is "no Lease", not an error
    created = await api.create(record("a"))
    assert (created.holder, created.duration, created.transitions) == ("a", 15, 0)
    assert created.resource_version == kube.lease(NAME)["metadata"]["resourceVersion"]  # type: ignore[index]
    stored = kube.lease(NAME)
    assert stored is not None and stored["metadata"]["uid"] and stored["metadata"]["namespace"] == NS
    spec = stored["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert MICRO.match(spec["acquireTime"]) and MICRO.match(spec["renewTime"])
    assert spec["renewTime"] == "2026-11-28T14:09:20.250000Z"

    read = await api.get()
    assert read == created and read is not None and read.renew_time == 1_795_874_960.25
    renewed = await api.replace(LeaseRecord("a", 15, read.acquire_time, read.renew_time + 2, 0,
                                            read.resource_version, read.metadata))
    assert int(renewed.resource_version) > int(created.resource_version)
    assert renewed.metadata["uid"] == stored["metadata"]["uid"]  # the same object, a new version
    assert [(r["method"], r["name"]) for r in kube.lease_requests] == [
        ("GET", NAME), ("POST", ""), ("GET", NAME), ("PUT", NAME)]
    assert all(r["auth"] == "Bearer fake-token" for r in kube.lease_requests)


async def test_stale_update_and_duplicate_create_are_conflicts(kube: FakeKube, api: LeaseApi) -> None:
    first = await api.create(record("a"))
    with pytest.raises(LeaseConflict, match="already exists"):
        await api.create(record("b"))
    kube.put_lease(NAME, {"holderIdentity": "b", "leaseDurationSeconds": 15})  # someone else wrote
    with pytest.raises(LeaseConflict, match="the object has been modified"):
        await api.replace(LeaseRecord("a", 15, None, None, 1, first.resource_version))
    assert kube.lease(NAME)["spec"]["holderIdentity"] == "b"  # type: ignore[index]


async def test_refusals_are_errors_with_their_status(kube: FakeKube, api: LeaseApi) -> None:
    with pytest.raises(LeaseApiError) as missing:  # no create-on-update for Leases
        await api.replace(record("a", rv="5"))
    assert missing.value.status == 404 and "not found" in str(missing.value)
    await api.create(record("a"))
    with pytest.raises(LeaseApiError) as invalid:
        await api.replace(LeaseRecord("a", 0, None, None, -1, ""))
    assert invalid.value.status == 422 and "leaseDurationSeconds" in str(invalid.value)
    kube.lease_fail_status = 503
    with pytest.raises(LeaseApiError) as down:
        await api.get()
    assert down.value.status == 503


async def test_micro_time_with_other_precision_is_refused_as_the_api_server_does(kube: FakeKube,
                                                                                  api: LeaseApi) -> None:
    from kubernetes_asyncio import client

    body = record("a").to_object(NAME, NS)
    body["spec"]["renewTime"] = "2026-11-28T14:09:20.25Z"  # what a careless formatter writes
    resp = await client.CoordinationV1Api(api.api_client).create_namespaced_lease(NS, body, _preload_content=False)
    assert resp.status == 400 and "RFC3339Micro" in (await resp.json())["message"]
    resp.release()


# ---- whole election loops ---------------------------------------------------------------------------------

Start = Callable[..., Awaitable[LeaderElector]]


@pytest.fixture
async def start(kube: FakeKube, tmp_path: Path) -> AsyncIterator[Start]:
    """Run electors against the fake (short timings); each is cancelled at the end."""
    kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
    tasks: dict[LeaderElector, asyncio.Task[None]] = {}

    async def run(identity: str, **overrides: Any) -> LeaderElector:
        settings = HaSettings(**{"enabled": True, "lease_duration": 2, "renew_deadline": 1.5,
                                 "retry_period": 0.2, "identity": identity, **overrides})
        elector = LeaderElector(settings, NS, kubeconfig)
        tasks[elector] = asyncio.create_task(elector.run())
        return elector

    async def stop(elector: LeaderElector) -> None:
        task = tasks.pop(elector)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run.stop = stop  # type: ignore[attr-defined]
    yield run
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


def leaders(*electors: LeaderElector) -> list[str]:
    return [e.identity for e in electors if e.is_leader()]


async def test_one_of_two_leads_and_a_cancelled_leader_hands_over_at_once(kube: FakeKube, start: Start) -> None:
    a, b = await start("a"), await start("b")
    await eventually(lambda: len(leaders(a, b)) == 1, what="one leader")
    first, second = (a, b) if a.is_leader() else (b, a)
    await asyncio.sleep(1.0)  # several renewals later: still exactly that one
    assert leaders(a, b) == [first.identity] and second.holder == first.identity
    lease = kube.lease(NAME)
    assert lease is not None and lease["spec"]["holderIdentity"] == first.identity
    assert lease["spec"]["leaseTransitions"] == 0 and second.to_dict()["takeover_in"] is not None

    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    await start.stop(first)  # type: ignore[attr-defined]
    assert not first.is_leader()
    released = kube.lease(NAME)
    assert released is not None and released["spec"]["holderIdentity"] == ""
    assert released["spec"]["leaseDurationSeconds"] == 1
    await eventually(lambda: second.is_leader(), timeout=2.0, what="takeover")
    # at the standby's next read (≤ 1.2 retry periods), not after the 2 s lease duration
    assert loop.time() - cancelled_at < 1.0
    taken = kube.lease(NAME)
    assert taken is not None and taken["spec"]["holderIdentity"] == second.identity
    assert taken["spec"]["leaseTransitions"] == 1


async def test_a_silent_leader_is_replaced_only_after_the_lease_duration(kube: FakeKube, start: Start) -> None:
    a = await start("a")
    await eventually(a.is_leader, what="a leads")
    b = await start("b")
    await eventually(lambda: b.holder == "a", what="b sees a")
    # a goes silent without releasing (as if SIGKILLed): its Lease stops changing
    frozen = kube.lease(NAME)
    assert frozen is not None
    a_task_stopped = asyncio.get_running_loop().time()
    a.release_on_cancel = False
    await start.stop(a)  # type: ignore[attr-defined]
    assert kube.lease(NAME) == frozen
    await eventually(b.is_leader, timeout=4.0, what="takeover")
    waited = asyncio.get_running_loop().time() - a_task_stopped
    assert 2.0 - 0.2 - 0.05 <= waited <= 2.0 + 0.5  # lease duration, less the read period before a stopped
    assert kube.lease(NAME)["spec"]["holderIdentity"] == "b"  # type: ignore[index]


async def test_leader_steps_down_when_the_api_server_is_gone_and_nobody_takes_over(kube: FakeKube,
                                                                                   start: Start) -> None:
    a = await start("a")
    await eventually(a.is_leader, what="a leads")
    b = await start("b")
    await eventually(lambda: b.holder == "a", what="b sees a")
    loop = asyncio.get_running_loop()
    kube.lease_fail_status = 503  # the Lease API fails for everyone
    failing_since = loop.time()
    await eventually(lambda: not a.is_leader(), timeout=3.0, what="step down")
    assert loop.time() - failing_since <= 1.5 + 0.05  # the renew deadline, from the last good renewal
    assert "503" in a.to_dict()["last_error"]
    await asyncio.sleep(0.6)  # past a's lease duration: b cannot take what it cannot read or write
    assert leaders(a, b) == []
    kube.lease_fail_status = 0
    await eventually(lambda: len(leaders(a, b)) == 1, timeout=3.0, what="a leader again")
    await asyncio.sleep(0.5)
    [leader] = leaders(a, b)
    assert kube.lease(NAME)["spec"]["holderIdentity"] == leader  # type: ignore[index]
    assert a.to_dict()["last_error"] == b.to_dict()["last_error"] == ""  # cleared by the first good step
