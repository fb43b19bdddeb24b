"""End to end, issue 8 "Beyond HAProxy": device pools and fallback, predictive FPS admission,
selection strategies, merged status filters. The real ``serve`` process in front of real simulated workers."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import WorkerFactory
from tests.lb import Balancer, get_json, request, start_balancer, start_pipeline, wait_until

GPU_START = {"source": {"uri": "file:///videos/cars.mp4", "type": "uri"},
             "parameters": {"detection-device": "GPU", "classification-device": "GPU"}}
CPU_START = {"source": {"uri": "file:///videos/cars.mp4", "type": "uri"}, "parameters": {"detection-device": "CPU"}}
ANY_START = {"source": {"uri": "file:///videos/cars.mp4", "type": "uri"}}


def sim(start_worker: WorkerFactory, *args: str) -> str:
    return start_worker("--noise", "0", *args).url  # type: ignore[attr-defined, no-any-return]


def worker_of(lb: Balancer, url: str) -> dict[str, Any]:
    return next(w for w in lb.backends()["workers"] if w["name"] == url)


def test_device_pools_and_fallback(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    gpu1, gpu2, cpu = sim(start_worker), sim(start_worker), sim(start_worker)
    workers = [f"{gpu1}#GPU", f"{gpu2}#GPU", f"{cpu}#CPU"]

    # without fallback: GPU starts round-robin over the GPU workers only; a full pool is named in the 503
    lb = start_balancer(workers, "--max-running-pipelines", "1")
    balancers.append(lb)
    assert {w["name"]: w["device"] for w in lb.backends()["workers"]} == {gpu1: "GPU", gpu2: "GPU", cpu: "CPU"}
    served = [start_pipeline(lb.url, GPU_START)[1]["X-Pipeline-Worker"] for _ in range(2)]
    assert served == [gpu1, gpu2]
    status, headers, body = start_pipeline(lb.url, GPU_START)
    reply = json.loads(body)
    assert status == 503 and "Retry-After" in headers
    assert (reply["pool"], reply["error"], reply["full"]) == ("GPU", "no GPU worker has room", 2)
    assert set(reply["reasons"]) == {gpu1, gpu2} and "fallback" not in reply
    status, headers, _ = start_pipeline(lb.url, CPU_START)
    assert (status, headers["X-Pipeline-Worker"]) == (200, cpu)
    lb.stop()

    # with DEVICE_FALLBACK=GPU:CPU: GPU first; when every GPU worker is full, a CPU worker, asked for CPU
    for url in (gpu1, gpu2, cpu):
        for entry in get_json(url + "/pipelines/status"):
            request("DELETE", f"{url}/pipelines/{entry['id']}")
    lb = start_balancer(workers, "--max-running-pipelines", "1", env={"DEVICE_FALLBACK": "GPU:CPU"})
    balancers.append(lb)
    served = []
    for _ in range(3):
        status, headers, body = start_pipeline(lb.url, GPU_START)
        assert status == 200, body
        served.append((headers["X-Pipeline-Worker"], headers.get("X-Pipeline-Device-Fallback")))
    assert served == [(gpu1, None), (gpu2, None), (cpu, "GPU->CPU")]
    moved = json.loads(body)
    summary = get_json(f"{cpu}/pipelines/{moved}")  # what the CPU worker was really asked
    assert summary["request"]["parameters"] == {"detection-device": "CPU", "classification-device": "CPU"}
    status, _, body = start_pipeline(lb.url, GPU_START)
    reply = json.loads(body)
    assert status == 503 and (reply["pool"], reply["fallback"], reply["full"]) == ("GPU", "CPU", 3)
    assert reply["error"] == "no GPU or CPU worker has room"
    # a start that asks for no device may go to any worker: none has room now
    assert json.loads(start_pipeline(lb.url, ANY_START)[2])["pool"] == "any"
    assert lb.backends()["limits"]["device_fallback"] == "GPU:CPU"


def test_predictive_admission_reaches_the_theoretical_maximum(
    start_worker: WorkerFactory, balancers: list[Balancer]
) -> None:
    """The stream-density benchmark, scaled down: capacities 130 and 100, TARGET_FPS 30, file sources,
    starts one after another until refused. 130/4 = 32.5 > 30 but 130/5 = 26; 100/3 = 33.3 but
    100/4 = 25: exactly 4 + 3 = 7 admitted, and no stream below target afterwards.

    Each start waits until it is visible and its worker has a capacity estimate: a worker whose
    streams are all still warming up has none, and then only the other rules decide.
    """
    big, small = sim(start_worker, "--capacity-fps", "130"), sim(start_worker, "--capacity-fps", "100")
    lb = start_balancer([big, small], "--predictive", env={"TARGET_FPS": "30"})
    balancers.append(lb)
    admitted: list[str] = []
    refusal: dict[str, Any] = {}
    for _ in range(12):
        status, headers, body = start_pipeline(lb.url)
        if status != 200:
            assert status == 503, body
            refusal = json.loads(body)
            break
        url = headers["X-Pipeline-Worker"]
        admitted.append(url)
        count = admitted.count(url)
        wait_until(lambda url=url, count=count: (w := worker_of(lb, url))["active"] == count  # type: ignore[misc]
                   and w["reserved"] == 0 and w["predicted_fps"] is not None, 10, lambda: str(lb.backends()))
    assert (admitted.count(big), admitted.count(small)) == (4, 3), admitted
    assert refusal["full"] == 2
    for url, predicted in ((big, 26.0), (small, 25.0)):  # whole-frame counts make it approximate
        found = re.search(r"would run at ~([\d.]+) fps <= TARGET_FPS 30", refusal["reasons"][url])
        assert found and float(found.group(1)) == pytest.approx(predicted, abs=1.0), refusal

    # settled: every worker measured with all its streams; each stream above target
    def settled() -> bool:
        return all(w["capacity_streams"] == w["running"] and all(i["current_fps"] is not None for i in w["instances"])
                   for w in lb.backends()["workers"])

    wait_until(settled, 10, lambda: str(lb.backends()))
    for w in lb.backends()["workers"]:
        expected = 130 if w["name"] == big else 100
        assert w["capacity_fps"] == pytest.approx(expected, rel=0.02)
        assert w["fps"]["min"] > 30, w
        assert w["state"] == "full" and "would run at" in w["reason"]
    # what the workers themselves report, cumulative average included
    for url in (big, small):
        assert all(e["avg_fps"] > 30 for e in get_json(url + "/pipelines/status") if e["state"] == "RUNNING")


def test_strategies(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    small, big = sim(start_worker, "--capacity-fps", "130"), sim(start_worker, "--capacity-fps", "400")
    for url in (small, small, big):  # started on the workers directly: the balancer did not place them
        assert start_pipeline(url)[0] == 200

    lb = start_balancer([small, big], "--strategy", "least-pipelines")
    balancers.append(lb)
    wait_until(lambda: [w["active"] for w in lb.backends()["workers"]] == [2, 1], 5)
    served = [start_pipeline(lb.url)[1]["X-Pipeline-Worker"] for _ in range(3)]
    assert served == [big, small, big]  # 2-1 → 2-2, a tie taken in round-robin order → 3-2 → 3-3
    lb.stop()

    # most-headroom: where a new stream would run fastest (big: 400/4 = 100, then 80; small: 130/4 = 32.5)
    lb = start_balancer([small, big], "--strategy", "most-headroom")
    balancers.append(lb)
    wait_until(lambda: all(w["predicted_fps"] is not None for w in lb.backends()["workers"]), 10,
               lambda: str(lb.backends()))
    predicted = {w["name"]: w["predicted_fps"] for w in lb.backends()["workers"]}
    assert predicted[big] > predicted[small]
    assert [start_pipeline(lb.url)[1]["X-Pipeline-Worker"] for _ in range(2)] == [big, big]
    assert lb.backends()["limits"]["strategy"] == "most-headroom"


def test_merged_status_filters_and_worker_field(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    urls = [sim(start_worker), sim(start_worker)]
    lb = start_balancer(urls)
    balancers.append(lb)
    owners = {}
    for _ in range(3):
        status, headers, body = start_pipeline(lb.url)
        assert status == 200
        owners[json.loads(body)] = headers["X-Pipeline-Worker"]
    stopped = next(iter(owners))
    assert request("DELETE", f"{lb.url}/pipelines/{stopped}")[0] == 200
    wait_until(lambda: get_json(f"{lb.url}/pipelines/status/{stopped}")["state"] == "ABORTED", 5)

    everything = get_json(lb.url + "/pipelines/status")
    assert sorted(e["id"] for e in everything) == sorted(owners) and all("worker" not in e for e in everything)
    running = get_json(lb.url + "/pipelines/status?state=RUNNING")
    assert sorted(e["id"] for e in running) == sorted(set(owners) - {stopped})
    assert {e["state"] for e in running} == {"RUNNING"}
    assert [e["id"] for e in get_json(lb.url + "/pipelines/status?state=aborted")] == [stopped]
    both = get_json(lb.url + "/pipelines/status?state=RUNNING,ABORTED&state=QUEUED")
    assert sorted(e["id"] for e in both) == sorted(owners)
    named = get_json(lb.url + "/pipelines/status?worker=true")
    assert {e["id"]: e["worker"] for e in named} == owners
    # the worker's own fields, untouched (a stopped instance's entry no longer changes)
    frozen = next(e for e in named if e["id"] == stopped)
    assert {k: v for k, v in frozen.items() if k != "worker"} == next(e for e in everything if e["id"] == stopped)

    status, headers, body = request("GET", lb.url + "/pipelines/status?state=RUNING")
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    reply = json.loads(body)
    assert reply["error"] == "unknown state RUNING" and "RUNNING" in reply["allowed"]
    status, _, body = request("GET", lb.url + "/pipelines/status?worker=maybe")
    assert status == 400 and json.loads(body)["parameter"] == "worker"
