"""End to end: ``pipeline-balancer serve --kubernetes`` (a real process, KUBECONFIG pointing at the
fake API server) in front of simulated workers whose pods point at 127.0.0.2, 127.0.0.3, … ."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerFactory
from tests.fakekube import FakeKubeThread
from tests.lb import FILE_SOURCE, START_PATH, Balancer, get_json, request, start_pipeline, wait_until
from tests.procs import balancer_cmd, free_port, wait_http

pytestmark = pytest.mark.timeout(90)
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def worker_port() -> int:
    """8080, as in a cluster, unless something on this machine holds it on one of our addresses."""
    for port in [8080] + [free_port() for _ in range(5)]:
        try:
            for host in HOSTS:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every loopback address")


@pytest.fixture
def kube() -> Iterator[FakeKubeThread]:
    server = FakeKubeThread()
    yield server
    server.close()


def serve_kubernetes(kube: FakeKubeThread, kubeconfig: Path, port: int) -> Balancer:
    listen = free_port()
    cmd = balancer_cmd("serve", "--kubernetes", "--namespace", "pipeline-server", "--worker-port", str(port),
                       "--listen", f"127.0.0.1:{listen}", "--poll-interval", "0.25", "--poll-timeout", "0.5")
    env = {"KUBECONFIG": str(kubeconfig), "WATCH_BACKOFF_MIN": "0.1", "WATCH_BACKOFF_MAX": "0.3",
           "WATCH_TIMEOUT_MIN": "30", "WATCH_TIMEOUT_MAX": "60", "STALE_AFTER": "2"}
    proc = Balancer(cmd, env=env, name="balancer")
    proc.url = f"http://127.0.0.1:{listen}"
    wait_http(proc.url + "/healthz", proc=proc.popen)
    return proc


def states(lb: Balancer) -> dict[str, str]:
    return {w["name"]: w["state"] for w in lb.backends()["workers"]}


def start_many(lb: Balancer, n: int, device: str | None = None) -> list[tuple[str, str]]:
    """``n`` starts (for any device, or asking for ``device``): (worker name, instance id) of each."""
    served = []
    payload = {"source": FILE_SOURCE["source"], "parameters": {"detection-device": device} if device else {}}
    for _ in range(n):
        status, headers, body = start_pipeline(lb.url, payload)
        assert status == 200, body
        served.append((headers["X-Pipeline-Worker"], json.loads(body)))
    return served


def test_serve_kubernetes_routes_only_to_ready_pods_and_survives_api_outage(
    kube: FakeKubeThread, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    port = worker_port()
    for host in HOSTS:
        start_worker("--noise", "0", host=host, port=port)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    kube.add_pod("ps-cpu-worker-a", ip=HOSTS[0], ready=True, owner="ps-cpu-worker")
    kube.add_pod("ps-cpu-worker-b", ip=HOSTS[1], ready=False, owner="ps-cpu-worker")
    kube.add_pod("ps-gpu-worker-c", ip=HOSTS[2], ready=True, owner="ps-gpu-worker")
    kube.add_pod("mqtt", ip="127.0.0.9", ready=True, labels={"app": "mqtt"})

    kube.stop()  # the API server is down when the balancer starts: not ready until the first list
    lb = serve_kubernetes(kube, kubeconfig, port)
    try:
        assert request("GET", lb.url + "/readyz")[0] == 503
        wait_until(lambda: lb.backends()["discovery"]["last_error"] != "", 5, lambda: str(lb.backends()))
        assert request("GET", lb.url + "/readyz")[0] == 503 and lb.backends()["workers"] == []
        kube.start()
        wait_until(lambda: request("GET", lb.url + "/readyz")[0] == 200, 10, lambda: str(lb.backends()))
        both_ready = {"ps-cpu-worker-a": "ready", "ps-gpu-worker-c": "ready"}
        wait_until(lambda: states(lb).items() >= both_ready.items(), 10, lambda: str(states(lb)))
        backends = lb.backends()
        by_name = {w["name"]: w for w in backends["workers"]}
        assert set(by_name) == {"ps-cpu-worker-a", "ps-cpu-worker-b", "ps-gpu-worker-c"}
        assert by_name["ps-cpu-worker-a"]["url"] == f"http://{HOSTS[0]}:{port}"
        assert (by_name["ps-cpu-worker-a"]["device"], by_name["ps-gpu-worker-c"]["device"]) == ("CPU", "GPU")
        assert by_name["ps-cpu-worker-b"]["state"] != "ready"
        assert backends["discovery"]["synced"] and backends["discovery"]["connected"]

        # Starts land only on ready pods.
        served = start_many(lb, 6)
        assert Counter(name for name, _ in served) == {"ps-cpu-worker-a": 3, "ps-gpu-worker-c": 3}

        # Pods are told apart by their DaemonSet: a start asking for the GPU goes to the GPU pod only.
        assert {name for name, _ in start_many(lb, 2, "GPU")} == {"ps-gpu-worker-c"}

        # b becomes Ready: it takes starts too.
        kube.set_ready("ps-cpu-worker-b")
        wait_until(lambda: states(lb)["ps-cpu-worker-b"] == "ready", 5, lambda: str(states(lb)))
        assert {name for name, _ in start_many(lb, 3)} == {"ps-cpu-worker-a", "ps-cpu-worker-b", "ps-gpu-worker-c"}

        # a is being deleted: from the moment the balancer has that one event, no start goes to it,
        # but its own instances still answer through the balancer.
        deleting = kube.begin_delete("ps-cpu-worker-a")
        version = int(deleting["metadata"]["resourceVersion"])
        wait_until(lambda: int(lb.backends()["discovery"]["resource_version"]) >= version, 5)
        assert "ps-cpu-worker-a" not in {name for name, _ in start_many(lb, 4)}
        assert states(lb)["ps-cpu-worker-a"] == "terminating"
        a_instance = next(i for name, i in served if name == "ps-cpu-worker-a")
        status, headers, _ = request("GET", lb.url + f"{START_PATH}/{a_instance}/status")
        assert status == 200 and headers["X-Pipeline-Worker"] == "ps-cpu-worker-a"
        kube.finish_delete("ps-cpu-worker-a")
        wait_until(lambda: "ps-cpu-worker-a" not in states(lb), 5, lambda: str(states(lb)))

        # The API server goes away: the workers it told us about keep serving, nothing is removed.
        kube.stop()
        wait_until(lambda: not lb.backends()["discovery"]["connected"], 5, lambda: str(lb.backends()["discovery"]))
        during = start_many(lb, 4)
        assert {name for name, _ in during} == {"ps-cpu-worker-b", "ps-gpu-worker-c"}
        for name, instance in during[:2]:
            status, headers, _ = request("GET", lb.url + f"/pipelines/status/{instance}")
            assert status == 200 and headers["X-Pipeline-Worker"] == name
        assert set(states(lb)) == {"ps-cpu-worker-b", "ps-gpu-worker-c"}

        # Meanwhile a pod was added and history compacted: on return the balancer re-lists.
        kube.add_pod("ps-gpu-worker-d", ip=HOSTS[3], ready=True, owner="ps-gpu-worker")
        kube.compact()
        kube.start()
        wait_until(lambda: states(lb).get("ps-gpu-worker-d") == "ready", 10, lambda: str(lb.backends()))
        discovery: dict[str, Any] = lb.backends()["discovery"]
        assert discovery["connected"] and discovery["relists"] == 1 and discovery["restarts"] >= 1
        assert {name for name, _ in start_many(lb, 3)} == {"ps-cpu-worker-b", "ps-gpu-worker-c", "ps-gpu-worker-d"}
        metrics = request("GET", lb.url + "/metrics")[2].decode()
        assert "pipeline_balancer_watch_relists_total 1.0" in metrics
        assert "pipeline_balancer_watch_connected 1.0" in metrics
        assert get_json(lb.url + "/pipelines/status")  # the merged list still works across the change
    except BaseException:
        print(lb.output()[-6000:])
        raise
    finally:
        lb.stop()
