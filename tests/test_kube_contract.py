"""Contract tests: the real kubernetes_asyncio client, over HTTP, against the fake API server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from balancer.config import DiscoverySettings
from balancer.discovery.base import WorkerSpec
from balancer.discovery.kubernetes import KubernetesDiscovery
from tests.fakekube import FakeKube

pytestmark = pytest.mark.timeout(30)


class Sink:
    """Records every call and mirrors the pool's table."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.workers: dict[str, WorkerSpec] = {}

    def replace_workers(self, specs: list[WorkerSpec]) -> None:
        self.calls.append(("replace", sorted(s.key for s in specs)))
        self.workers = {s.key: s for s in specs}

    def upsert_worker(self, spec: WorkerSpec) -> None:
        self.calls.append(("upsert", spec))
        self.workers[spec.key] = spec

    def remove_worker(self, key: str) -> None:
        self.calls.append(("remove", key))
        self.workers.pop(key, None)

    def by_name(self) -> dict[str, WorkerSpec]:
        return {s.name: s for s in self.workers.values()}


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Wait until ``check()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def key(pod: dict[str, Any]) -> str:
    return f"{pod['metadata']['name']}/{pod['metadata']['uid']}"


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    server = FakeKube()
    await server.start()
    yield server
    await server.stop()


Start = Callable[..., Awaitable[tuple[KubernetesDiscovery, Sink]]]


@pytest.fixture
async def start(kube: FakeKube, tmp_path: Path) -> AsyncIterator[Start]:
    """Run discovery against the fake; every run task is cancelled (and must end only by that)."""
    tasks: list[asyncio.Task[None]] = []
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")

    async def run(wait_synced: bool = True, inject: dict[str, Any] | None = None, **overrides: Any
                  ) -> tuple[KubernetesDiscovery, Sink]:
        fields: dict[str, Any] = {
            "source": "kubernetes", "namespace": "pipeline-server", "kubeconfig": str(kubeconfig),
            "watch_timeout_min": 60, "watch_timeout_max": 60, "backoff_min": 0.05, "backoff_max": 0.2,
            "api_timeout": 2.0, **overrides}
        discovery = KubernetesDiscovery(DiscoverySettings(**fields), **(inject or {}))
        sink = Sink()
        tasks.append(asyncio.create_task(discovery.run(sink)))
        if wait_synced:
            await eventually(lambda: discovery.synced, what="first list")
            await kube.wait_watchers(1)
        return discovery, sink

    run.tasks = tasks  # type: ignore[attr-defined]
    yield run
    for task in tasks:
        if task.done():  # only a test's own cancel may have ended it
            assert task.cancelled(), f"discovery.run ended by itself: {task}"
            continue
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_lists_then_watches_from_the_list_version(kube: FakeKube, start: Start) -> None:
    a = kube.add_pod("ps-gpu-worker-a", ip="10.1.0.1", ready=True, node="gpu-node", owner="ps-gpu-worker")
    b = kube.add_pod("ps-b", labels={"app": "pipeline-server", "device": "cpu"})
    kube.add_pod("other", ip="10.1.0.9", ready=True, labels={"app": "mqtt"})
    kube.add_pod("elsewhere", ip="10.1.0.8", ready=True, namespace="default")
    discovery, sink = await start(watch_timeout_min=100, watch_timeout_max=200)

    assert sink.calls[0] == ("replace", sorted([key(a), key(b)]))
    gpu, cpu = sink.workers[key(a)], sink.workers[key(b)]
    assert (gpu.url, gpu.routable, gpu.device, gpu.node) == ("http://10.1.0.1:8080", True, "GPU", "gpu-node")
    assert (cpu.url, cpu.routable, cpu.reason, cpu.device) == ("", False, "no pod IP", "CPU")

    [listed] = kube.list_requests()
    assert listed["labelSelector"] == "app=pipeline-server"
    [watch] = kube.watch_requests()
    assert watch["watch"].lower() == "true" and watch["allowWatchBookmarks"].lower() == "true"
    assert watch["resourceVersion"] == str(kube.rv)  # the list's version: nothing in between is missed
    assert 100 <= int(watch["timeoutSeconds"]) <= 200
    assert all(r["auth"] == "Bearer fake-token" for r in kube.requests)
    state = discovery.to_dict()
    assert state | {"last_event_at": None} == {
        "source": "kubernetes", "namespace": "pipeline-server", "selector": "app=pipeline-server",
        "synced": True, "connected": True, "resource_version": str(kube.rv), "restarts": 0, "relists": 0,
        "last_error": "", "last_error_at": None, "last_event_at": None, "workers": 2}


async def test_pod_lifecycle_reaches_the_sink_event_by_event(kube: FakeKube, start: Start) -> None:
    _, sink = await start()
    pod = kube.add_pod("w1")
    await eventually(lambda: key(pod) in sink.workers, what="ADDED")
    assert sink.workers[key(pod)].reason == "no pod IP"
    kube.set_ip("w1", "10.1.0.7")
    await eventually(lambda: sink.workers[key(pod)].reason == "not ready", what="IP")
    assert sink.workers[key(pod)].url == "http://10.1.0.7:8080"
    kube.set_ready("w1")
    await eventually(lambda: sink.workers[key(pod)].routable, what="Ready")
    kube.begin_delete("w1")
    await eventually(lambda: sink.workers[key(pod)].terminating, what="deletionTimestamp")
    assert not sink.workers[key(pod)].routable and sink.workers[key(pod)].url == "http://10.1.0.7:8080"
    kube.finish_delete("w1")
    await eventually(lambda: key(pod) not in sink.workers, what="DELETED")
    states = [(c[1].reason, c[1].terminating) for c in sink.calls if c[0] == "upsert"]
    assert states == [("no pod IP", False), ("not ready", False), ("", False), ("terminating", True)]
    assert sink.calls[-1] == ("remove", key(pod))


async def test_recreated_pod_is_a_new_worker_at_its_new_address(kube: FakeKube, start: Start) -> None:
    old = kube.add_pod("w1", ip="10.1.0.1", ready=True)
    _, sink = await start()
    new = kube.recreate("w1", ip="10.1.0.2")
    await eventually(lambda: list(sink.workers) == [key(new)], what="the new pod only")
    assert sink.workers[key(new)].url == "http://10.1.0.2:8080" and sink.workers[key(new)].routable
    assert ("remove", key(old)) in sink.calls


@pytest.mark.parametrize("server_side_selector", [True, False], ids=["DELETED", "MODIFIED"])
async def test_pod_leaving_the_selector_is_removed(kube: FakeKube, start: Start,
                                                  server_side_selector: bool) -> None:
    kube.server_side_selector = server_side_selector
    pod = kube.add_pod("w1", ip="10.1.0.1", ready=True)
    _, sink = await start()
    kube.set_labels("w1", {"app": "retired"})
    await eventually(lambda: key(pod) not in sink.workers, what="removal")
    kube.set_labels("w1", {"app": "pipeline-server"})
    await eventually(lambda: key(pod) in sink.workers, what="back in the selection")


async def test_stream_end_rewatches_from_the_last_version(kube: FakeKube, start: Start) -> None:
    discovery, sink = await start(watch_timeout_min=1, watch_timeout_max=1)
    pod = kube.add_pod("w1", ip="10.1.0.1", ready=True)
    await eventually(lambda: key(pod) in sink.workers)
    await eventually(lambda: len(kube.watch_requests()) >= 2, timeout=5, what="a second watch after timeoutSeconds")
    assert kube.watch_requests()[1]["resourceVersion"] == pod["metadata"]["resourceVersion"]
    kube.set_ready("w1", False)
    await eventually(lambda: not sink.workers[key(pod)].routable, what="an event on the new stream")
    state = discovery.to_dict()
    assert state["restarts"] >= 1 and state["relists"] == 0 and state["last_error"] == ""


async def test_bookmarks_advance_the_version_so_a_rewatch_needs_no_relist(kube: FakeKube, start: Start) -> None:
    discovery, sink = await start()
    kube.bump(50)  # other objects changed
    version = kube.bookmark()
    await eventually(lambda: discovery.to_dict()["resource_version"] == str(version), what="bookmark version")
    kube.compact()  # only versions >= the bookmark's can be resumed now
    kube.drop_streams()
    await eventually(lambda: len(kube.watch_requests()) == 2, what="re-watch")
    assert kube.watch_requests()[1]["resourceVersion"] == str(version)
    pod = kube.add_pod("w1", ip="10.1.0.1", ready=True)
    await eventually(lambda: key(pod) in sink.workers, what="an event after the re-watch")
    assert discovery.to_dict()["relists"] == 0 and len(kube.list_requests()) == 1


@pytest.mark.parametrize("gone_mode", ["http", "event"])
async def test_outage_keeps_workers_then_410_relists_and_replaces(kube: FakeKube, start: Start,
                                                                   gone_mode: str) -> None:
    kube.gone_mode = gone_mode
    a = kube.add_pod("a", ip="10.1.0.1", ready=True)
    b = kube.add_pod("b", ip="10.1.0.2", ready=True)
    discovery, sink = await start()
    await kube.stop()  # refuse connections
    await eventually(lambda: not discovery.to_dict()["connected"], what="disconnected")
    await asyncio.sleep(0.3)  # a few refused retries
    assert set(sink.workers) == {key(a), key(b)}  # nothing removed while the API server is away
    assert discovery.to_dict()["last_error"]
    assert not any(c[0] == "remove" for c in sink.calls)
    kube.finish_delete("b")  # the client misses these …
    c = kube.add_pod("c", ip="10.1.0.3", ready=True)
    kube.compact()  # … and cannot resume past them
    await kube.start()
    await eventually(lambda: set(sink.workers) == {key(a), key(c)}, what="the re-listed set")
    assert sink.calls[-1] == ("replace", sorted([key(a), key(c)]))
    state = discovery.to_dict()
    assert state["relists"] == 1 and state["connected"] and state["synced"]
    assert len(kube.list_requests()) == 2
    await kube.wait_watchers(1)
    assert kube.watch_requests()[-1]["resourceVersion"] == str(kube.rv)


async def test_in_stream_410_on_an_open_watch_relists(kube: FakeKube, start: Start) -> None:
    a = kube.add_pod("a", ip="10.1.0.1", ready=True)
    discovery, sink = await start()
    kube.hold = True  # a lagging watch cache: these changes never reach the open stream
    kube.finish_delete("a")
    b = kube.add_pod("b", ip="10.1.0.2", ready=True)
    kube.hold = False
    kube.expire_streams()
    await eventually(lambda: list(sink.workers) == [key(b)], what="the re-listed set")
    assert ("remove", key(a)) not in sink.calls and sink.calls[-1] == ("replace", [key(b)])
    assert discovery.to_dict()["relists"] == 1


async def test_cut_stream_resumes_without_relist(kube: FakeKube, start: Start) -> None:
    discovery, sink = await start()
    kube.drop_streams(abrupt=True)
    await eventually(lambda: len(kube.watch_requests()) == 2 and kube.watchers, what="re-watch")
    pod = kube.add_pod("w1", ip="10.1.0.1", ready=True)
    await eventually(lambda: key(pod) in sink.workers)
    assert discovery.to_dict()["relists"] == 0 and discovery.to_dict()["restarts"] == 1


class NoJitter(random.Random):
    def random(self) -> float:
        return 0.0


async def test_errors_back_off_exponentially_and_reset_after_success(kube: FakeKube, start: Start) -> None:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(round(seconds, 3))
        await asyncio.sleep(0.01)  # the real wait is injected away: no test sleeps 12 s

    pod = kube.add_pod("a", ip="10.1.0.1", ready=True)
    discovery, sink = await start(backoff_min=0.8, backoff_max=30.0,
                                  inject={"sleep": sleep, "rng": NoJitter(1)})
    kube.fail_status = 503
    kube.drop_streams()
    await eventually(lambda: len(delays) >= 6, what="six retries")
    assert delays[:6] == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6]
    assert key(pod) in sink.workers and not discovery.to_dict()["connected"]
    assert "503" in discovery.to_dict()["last_error"]
    kube.fail_status = 0
    await kube.wait_watchers(1)
    kube.set_ready("a", False)  # an event: the stream works, so the next failure starts over
    await eventually(lambda: not sink.workers[key(pod)].routable)
    kube.fail_status = 503
    seen = len(delays)
    kube.drop_streams()
    await eventually(lambda: len(delays) > seen, what="a retry")
    assert delays[seen] == 0.8
    assert discovery.to_dict()["relists"] == 0  # errors resume the watch, they do not re-list


async def test_missing_credentials_are_retried_until_they_appear(kube: FakeKube, start: Start,
                                                                 tmp_path: Path) -> None:
    kubeconfig = tmp_path / "later" / "kubeconfig"
    discovery, _ = await start(wait_synced=False, kubeconfig=str(kubeconfig))
    await eventually(lambda: "CredentialsError" in discovery.to_dict()["last_error"], what="an error")
    await asyncio.sleep(0.3)
    assert not discovery.synced and kube.requests == []
    kubeconfig.parent.mkdir()
    kube.write_kubeconfig(kubeconfig)
    await eventually(lambda: discovery.synced, what="sync once the kubeconfig exists")


async def test_cancel_closes_the_watch(kube: FakeKube, start: Start) -> None:
    discovery, _ = await start()
    [task] = start.tasks  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: not kube.watchers, what="the server to see the stream closed")
    assert discovery._api is None


async def test_an_old_version_expiring_after_an_outage_relists_at_once(kube: FakeKube, start: Start) -> None:
    """The backoff an outage built up must not delay the re-list once the API server answers 410."""
    delays: list[float] = []
    gate = asyncio.Event()
    gate.set()
    parked = asyncio.Event()

    async def sleep(seconds: float) -> None:
        delays.append(round(seconds, 3))
        parked.set()
        await gate.wait()
        await asyncio.sleep(0.01)

    kube.add_pod("a", ip="10.1.0.1", ready=True)
    discovery, sink = await start(backoff_min=0.8, backoff_max=30.0, inject={"sleep": sleep, "rng": NoJitter(1)})
    await kube.stop()
    await eventually(lambda: len(delays) >= 5, what="retries while down")
    gate.clear()
    parked.clear()
    await asyncio.wait_for(parked.wait(), 5)  # the loop now waits in a backoff sleep
    b = kube.add_pod("b", ip="10.1.0.2", ready=True)
    kube.compact()
    await kube.start()
    seen = len(delays)
    gate.set()
    await eventually(lambda: key(b) in sink.workers, what="the re-list")
    assert len(delays) == seen  # 410 → list → watch without another backoff sleep
    assert discovery.to_dict()["relists"] == 1
