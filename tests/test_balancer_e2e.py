"""End to end: the real ``pipeline-balancer serve`` process in front of real simulated worker processes."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import time
from collections import Counter

import pytest

from tests.conftest import WorkerFactory
from tests.fakeworker import FakeWorker
from tests.lb import START_PATH, Balancer, get_json, request, start_balancer, start_pipeline, wait_until
from tests.procs import free_port


def workers_of(start_worker: WorkerFactory, n: int, *args: str) -> list[str]:
    return [start_worker("--noise", "0", *args).url for _ in range(n)]  # type: ignore[attr-defined]


def test_round_robin_and_owner_routing(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    urls = workers_of(start_worker, 3)
    lb = start_balancer(urls)
    balancers.append(lb)
    served, ids = [], []
    for _ in range(6):
        status, headers, body = start_pipeline(lb.url)
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        served.append(headers["X-Pipeline-Worker"])
        ids.append(json.loads(body))
    assert served == urls + urls
    for instance_id, owner in zip(ids, served, strict=True):
        for path in (f"/pipelines/{instance_id}", f"{START_PATH}/{instance_id}", f"{START_PATH}/{instance_id}/status",
                     f"/pipelines/status/{instance_id}"):
            status, headers, body = request("GET", lb.url + path)
            assert status == 200, (path, body)
            assert headers["X-Pipeline-Worker"] == owner
            assert json.loads(body)["id"] == instance_id
    # both DELETE forms reach the owner
    status, headers, _ = request("DELETE", f"{lb.url}{START_PATH}/{ids[0]}")
    assert (status, headers["X-Pipeline-Worker"]) == (200, served[0])
    status, headers, _ = request("DELETE", f"{lb.url}/pipelines/{ids[1]}")
    assert (status, headers["X-Pipeline-Worker"]) == (200, served[1])
    wait_until(lambda: get_json(f"{lb.url}/pipelines/status/{ids[1]}")["state"] == "ABORTED", 5)

    # merged status holds every instance of every worker
    merged = get_json(lb.url + "/pipelines/status")
    assert sorted(e["id"] for e in merged) == sorted(ids)

    # an id nobody owns gets the worker's own answer; a malformed one is refused without asking
    unknown = "0" * 20 + "123456789abc"
    status, _, body = request("GET", f"{lb.url}{START_PATH}/{unknown}")
    assert (status, json.loads(body)) == (400, "Invalid pipeline, version or instance")
    status, _, body = request("GET", f"{lb.url}/pipelines/status/{unknown}")
    assert (status, json.loads(body)) == (400, "Invalid instance")
    status, _, body = request("GET", f"{lb.url}/pipelines/status/not-an-id")
    assert status == 400


def test_owner_routing_survives_balancer_restart(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    urls = workers_of(start_worker, 2)
    port = free_port()
    lb = start_balancer(urls, port=port)
    owners = {}
    for _ in range(4):
        status, headers, body = start_pipeline(lb.url)
        assert status == 200
        owners[json.loads(body)] = headers["X-Pipeline-Worker"]
    lb.signal(signal.SIGKILL)
    lb.wait(10)
    # restarted without waiting for its first poll: owners come from asking the workers
    lb2 = start_balancer(urls, port=port, wait_states=())
    balancers.append(lb2)
    for instance_id, owner in owners.items():
        status, headers, body = request("GET", f"{lb2.url}/pipelines/status/{instance_id}")
        assert status == 200, body
        assert headers["X-Pipeline-Worker"] == owner
    assert sorted(e["id"] for e in get_json(lb2.url + "/pipelines/status")) == sorted(owners)


def test_burst_admits_exactly_the_free_slots(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    """3 workers x MAX_RUNNING_PIPELINES=2, 20 concurrent starts: exactly 6 admitted, 14 told to retry."""
    urls = workers_of(start_worker, 3)
    lb = start_balancer(urls, env={"MAX_RUNNING_PIPELINES": "2"})
    balancers.append(lb)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: start_pipeline(lb.url), range(20)))
    codes = Counter(status for status, _, _ in results)
    assert codes == {200: 6, 503: 14}
    for status, headers, body in results:
        if status == 503:
            assert headers["Retry-After"] == "2"
            reply = json.loads(body)
            assert reply["error"] == "no CPU worker has room" and reply["full"] == 3
    for url in urls:  # ask each worker itself: none is over its limit
        active = [e for e in get_json(url + "/pipelines/status") if e["state"] in ("RUNNING", "QUEUED")]
        assert len(active) == 2
    wait_until(lambda: all(w["reserved"] == 0 and w["active"] == 2 for w in lb.backends()["workers"]), 5,
               lambda: str(lb.backends()))


@pytest.mark.parametrize("predictive", [False, True])
def test_target_fps_makes_a_worker_full(
    start_worker: WorkerFactory, balancers: list[Balancer], predictive: bool
) -> None:
    """Capacity 100: three file streams run at 33 fps (> 30), a fourth brings all to 25 (<= 30): full.

    Four starts in a row all get in (no stream has run long enough to measure the worker). Then,
    with one stream stopped, the seed's rule sees three streams above target and takes starts
    again; predictive admission knows a fourth would bring them back to 25 and keeps refusing.
    """
    url = start_worker("--noise", "0", "--capacity-fps", "100").url  # type: ignore[attr-defined]
    flag = "--predictive" if predictive else "--no-predictive"
    lb = start_balancer([url], flag, env={"TARGET_FPS": "30"})
    balancers.append(lb)
    for _ in range(4):
        assert start_pipeline(lb.url)[0] == 200
    wait_until(lambda: lb.worker_states()[url] == "full", 8, lambda: str(lb.backends()))
    worker = lb.backends()["workers"][0]
    assert "TARGET_FPS 30" in worker["reason"]
    assert worker["fps"]["min"] == pytest.approx(25, abs=1.5)
    status, headers, _body = start_pipeline(lb.url)
    assert status == 503 and "Retry-After" in headers
    # stopping one stream brings the others back above target: room again
    first = get_json(lb.url + "/pipelines/status")[0]["id"]
    assert request("DELETE", f"{lb.url}/pipelines/{first}")[0] == 200
    if not predictive:
        wait_until(lambda: lb.worker_states()[url] == "ready", 8, lambda: str(lb.backends()))
        return
    # three streams back above target: the seed's rule would take a fourth start, prediction does not
    wait_until(lambda: (lb.backends()["workers"][0]["fps"]["min"] or 0) > 31, 8, lambda: str(lb.backends()))
    worker = lb.backends()["workers"][0]
    assert worker["state"] == "full" and worker["running"] == 3, worker
    assert worker["predicted_fps"] == pytest.approx(25, abs=1.5), worker
    assert start_pipeline(lb.url)[0] == 503


def test_killed_worker_is_unhealthy_and_starts_go_elsewhere(
    start_worker: WorkerFactory, balancers: list[Balancer]
) -> None:
    procs = [start_worker("--noise", "0") for _ in range(3)]
    urls = [p.url for p in procs]  # type: ignore[attr-defined]
    lb = start_balancer(urls)
    balancers.append(lb)
    ids = [json.loads(start_pipeline(lb.url)[2]) for _ in range(3)]
    procs[1].signal(signal.SIGKILL)
    procs[1].wait(5)
    killed_at = time.monotonic()
    wait_until(lambda: lb.worker_states()[urls[1]] == "unhealthy", 5)
    noticed = time.monotonic() - killed_at
    worker = next(w for w in lb.backends()["workers"] if w["name"] == urls[1])
    assert "connect" in worker["error"]
    served = [start_pipeline(lb.url)[1]["X-Pipeline-Worker"] for _ in range(4)]
    assert urls[1] not in served and set(served) == {urls[0], urls[2]}
    # merged status leaves the dead worker out and names it
    status, headers, body = request("GET", lb.url + "/pipelines/status")
    assert status == 200
    assert headers["X-Pipeline-Balancer-Missing"] == urls[1]
    assert ids[1] not in {e["id"] for e in json.loads(body)}
    assert {ids[0], ids[2]} <= {e["id"] for e in json.loads(body)}
    # the dead worker's own instances: a clear 502, not a hang
    status, _, body = request("GET", f"{lb.url}/pipelines/status/{ids[1]}")
    assert status == 502 and json.loads(body)["worker"] == urls[1]
    print(f"killed worker noticed after {noticed:.2f}s (poll interval 0.25s)")


def test_undelivered_start_moves_to_next_worker(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    procs = [start_worker("--noise", "0") for _ in range(2)]
    urls = [p.url for p in procs]  # type: ignore[attr-defined]
    # slow polling: the balancer does not yet know the first worker is gone when the start arrives
    lb = start_balancer(urls, "--poll-interval", "30", env={"STALE_AFTER": "60"})
    balancers.append(lb)
    procs[0].signal(signal.SIGKILL)
    procs[0].wait(5)
    status, headers, _body = start_pipeline(lb.url)
    assert status == 200 and headers["X-Pipeline-Worker"] == urls[1]
    assert "pipeline_balancer_start_retries_total 1.0" in request("GET", lb.url + "/metrics")[2].decode()
    assert lb.worker_states()[urls[0]] == "unhealthy"


def test_sent_start_that_fails_is_never_replayed(fakes: list[FakeWorker], balancers: list[Balancer]) -> None:
    dropper, timeouter, healthy = FakeWorker().start(), FakeWorker().start(), FakeWorker().start()
    fakes.extend([dropper, timeouter, healthy])
    dropper.post_close = True
    timeouter.post_delay = 3
    lb = start_balancer([dropper.url, timeouter.url, healthy.url], env={"UPSTREAM_TIMEOUT": "1"})
    balancers.append(lb)
    status, _, body = start_pipeline(lb.url)
    assert status == 502 and json.loads(body)["worker"] == dropper.url
    status, _, body = start_pipeline(lb.url)
    assert status == 504 and json.loads(body)["worker"] == timeouter.url
    assert (dropper.starts_received, timeouter.starts_received, healthy.starts_received) == (1, 1, 0)
    assert start_pipeline(lb.url)[0] == 200
    assert healthy.starts_received == 1
    wait_until(lambda: all(w["reserved"] == 0 for w in lb.backends()["workers"]), 5, lambda: str(lb.backends()))


def test_garbage_status_makes_a_worker_unhealthy(fakes: list[FakeWorker], balancers: list[Balancer]) -> None:
    good, bad = FakeWorker().start(), FakeWorker().start()
    fakes.extend([good, bad])
    lb = start_balancer([good.url, bad.url])
    balancers.append(lb)
    bad.status_body = b'{"not": "a list"}'
    wait_until(lambda: lb.worker_states()[bad.url] == "unhealthy", 5)
    assert "not a list" in next(w for w in lb.backends()["workers"] if w["name"] == bad.url)["error"]
    bad.status_body = None
    wait_until(lambda: lb.worker_states()[bad.url] == "ready", 5)


def test_backends_metrics_and_probes(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    urls = workers_of(start_worker, 2)
    lb = start_balancer(urls, env={"MAX_RUNNING_PIPELINES": "1"})
    balancers.append(lb)
    ids = [json.loads(start_pipeline(lb.url)[2]) for _ in range(2)]
    assert start_pipeline(lb.url)[0] == 503
    wait_until(lambda: all(w["active"] == 1 for w in lb.backends()["workers"]), 5)
    backends = lb.backends()
    assert backends["discovery"] == {"source": "static", "synced": True, "workers": 2}
    for w, instance_id in zip(backends["workers"], ids, strict=True):
        assert {"name", "url", "state", "reason", "active", "reserved", "fps", "last_poll", "error"} <= set(w)
        assert (w["state"], w["active"], w["reserved"], w["error"]) == ("full", 1, 0, None)
        assert "MAX_RUNNING_PIPELINES 1" in w["reason"]
        assert w["instances"][0]["id"] == instance_id
        assert w["last_poll"] > time.time() - 5
    status, headers, body = request("GET", lb.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in (
        'pipeline_balancer_requests_total{code="200",method="POST",route="start"} 2.0',
        'pipeline_balancer_requests_total{code="503",method="POST",route="start"} 1.0',
        'pipeline_balancer_rejections_total{pool="CPU",reason="full"} 1.0',
        'pipeline_balancer_workers{state="full"} 2.0',
        'pipeline_balancer_admission_decisions_total{decision="admitted"} 2.0',
    ):
        assert line in text, line
    assert 'pipeline_balancer_upstream_latency_seconds_count{route="start"} 2.0' in text
    assert "pipeline_balancer_polls_total" in text and "pipeline_balancer_poll_failures_total" in text
    assert request("GET", lb.url + "/healthz")[0] == 200
    assert request("GET", lb.url + "/readyz")[0] == 200
    status, _, body = request("GET", lb.url + "/no/such/route")
    assert (status, json.loads(body)["error"]) == (404, "not found")
    status, headers, _ = request("PUT", lb.url + START_PATH, {})
    assert (status, headers["Allow"]) == (405, "GET, POST")


def test_bad_start_body_passes_worker_answer_and_holds_no_slot(
    start_worker: WorkerFactory, balancers: list[Balancer]
) -> None:
    urls = workers_of(start_worker, 1)
    lb = start_balancer(urls, env={"MAX_RUNNING_PIPELINES": "1"})
    balancers.append(lb)
    status, headers, body = start_pipeline(lb.url, b"{not json")
    assert status == 400 and headers["Content-Type"] == "application/problem+json"
    status, _, body = request("POST", lb.url + "/pipelines/nope/nope", {"source": {"type": "uri", "uri": "file:///x"}})
    assert (status, json.loads(body)) == (400, "Invalid Pipeline or Version")
    assert lb.backends()["workers"][0]["reserved"] == 0
    assert start_pipeline(lb.url)[0] == 200  # the only slot is still free
    status, _, _ = request("POST", lb.url + START_PATH, b"x" * (65 * 1024))
    assert status == 413


def test_curl_as_in_the_seed(start_worker: WorkerFactory, balancers: list[Balancer]) -> None:
    lb = start_balancer(workers_of(start_worker, 2))
    balancers.append(lb)
    body = ('{"source": {"uri": "https://github.com/intel-iot-devkit/sample-videos/raw/master/person-bicycle-car-'
            'detection.mp4", "type": "uri"}, "parameters": {"detection-device": "CPU"}}')
    out = subprocess.run(["curl", "-sS", f"{lb.url}{START_PATH}", "-X", "POST", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=10)
    instance_id = json.loads(out.stdout)
    assert len(instance_id) == 32
    out = subprocess.run(["curl", "-sS", f"{lb.url}/pipelines/status/{instance_id}"], capture_output=True,
                         text=True, timeout=10)
    assert json.loads(out.stdout)["state"] in ("QUEUED", "RUNNING")


def test_sigterm_drains_in_flight_requests(fakes: list[FakeWorker]) -> None:
    slow = FakeWorker().start()
    fakes.append(slow)
    slow.post_delay = 1.5
    lb = start_balancer([slow.url], "--shutdown-grace", "5")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(start_pipeline, lb.url)
            wait_until(lambda: slow.starts_received == 1, 5)
            lb.signal(signal.SIGTERM)
            host, port = lb.url.removeprefix("http://").split(":")

            def refused() -> bool:
                try:
                    socket.create_connection((host, int(port)), timeout=0.5).close()
                    return False
                except OSError:
                    return True

            wait_until(refused, 1.0)  # new connections are refused while the start finishes
            status, _, body = in_flight.result(10)
        assert status == 200 and len(json.loads(body)) == 32
        assert lb.wait(10) == 0
    finally:
        lb.stop()
