"""The fast upstream client against misbehaving workers, through the real ``serve`` process: slow and
hanging workers, workers closing pooled connections, the one retry an idempotent request may get, the
per-worker connection bound."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

from tests.fakeworker import FakeWorker
from tests.lb import Balancer, request, start_balancer, start_pipeline
from tests.rawhttp import Raw

QUIET_POLLS = ("--poll-interval", "5")
"""The health poller stays off the connection pool while a test arranges it (one poll at start-up)."""
QUIET_ENV = {"FRONT": "fast", "STALE_AFTER": "30", "POLL_TIMEOUT": "2"}


def test_hanging_worker_gets_504_and_its_late_answer_goes_nowhere(
    fakes: list[FakeWorker], balancers: list[Balancer]
) -> None:
    worker = FakeWorker().start()
    fakes.append(worker)
    lb = start_balancer([worker.url], env={"FRONT": "fast", "UPSTREAM_TIMEOUT": "1"})
    balancers.append(lb)
    worker.definitions_delay = 2.5
    status, headers, body = request("GET", lb.url + "/pipelines")
    assert status == 504 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "worker timed out", "worker": worker.url, "detail": "no answer in time"}
    worker.definitions_delay = 0
    time.sleep(1.6)  # the late answer is written by now: it must not be read as the next request's
    for _ in range(3):
        status, _, body = request("GET", lb.url + "/pipelines")
        assert status == 200 and json.loads(body)[0]["name"] == "object_detection"


def test_worker_closing_idle_connections_is_harmless(fakes: list[FakeWorker], balancers: list[Balancer]) -> None:
    worker = FakeWorker(keepalive_timeout=0.2).start()
    fakes.append(worker)
    # starts may reuse a connection only well within the worker's keep-alive timeout (docs/fast-path.md)
    lb = start_balancer([worker.url], *QUIET_POLLS, env={**QUIET_ENV, "START_REUSE_IDLE": "0.05"})
    balancers.append(lb)
    for _ in range(3):
        assert request("GET", lb.url + "/pipelines")[0] == 200
        assert start_pipeline(lb.url)[0] == 200
        time.sleep(0.5)  # the worker has closed the pooled connection: the balancer must not use it
    assert worker.starts_received == 3
    assert worker.requests["GET /pipelines"] == 3


def test_get_dropped_on_a_reused_connection_is_retried_once(
    fakes: list[FakeWorker], balancers: list[Balancer]
) -> None:
    worker = FakeWorker().start()
    fakes.append(worker)
    lb = start_balancer([worker.url], *QUIET_POLLS, env=QUIET_ENV)
    balancers.append(lb)
    assert request("GET", lb.url + "/pipelines")[0] == 200  # leaves a warm pooled connection
    worker.drop_definitions = 1
    status, _, body = request("GET", lb.url + "/pipelines")
    assert status == 200 and json.loads(body)[0]["name"] == "object_detection"
    assert worker.requests["GET /pipelines"] == 3  # warm-up, dropped, retried

    worker.drop_definitions = 2  # the retry on a new connection is dropped too: 502, no third try
    status, _, body = request("GET", lb.url + "/pipelines")
    assert status == 502 and json.loads(body)["error"] == "worker unreachable or broken"
    assert worker.requests["GET /pipelines"] == 5


def test_start_dropped_on_a_reused_connection_is_never_replayed(
    fakes: list[FakeWorker], balancers: list[Balancer]
) -> None:
    worker, other = FakeWorker().start(), FakeWorker().start()
    fakes.extend([worker, other])
    lb = start_balancer([worker.url, other.url], *QUIET_POLLS, env=QUIET_ENV)
    balancers.append(lb)
    assert start_pipeline(lb.url)[0] == 200  # worker: warm connection
    assert start_pipeline(lb.url)[0] == 200  # other
    worker.post_close = True

    def reserved() -> int:
        return next(w["reserved"] for w in lb.backends()["workers"] if w["name"] == worker.url)

    before = reserved()  # the first start, not yet seen in a status list (polls are slow here)
    status, _, body = start_pipeline(lb.url)
    assert status == 502 and json.loads(body)["worker"] == worker.url
    assert (worker.starts_received, other.starts_received) == (2, 1)
    assert reserved() == before  # the failed start holds no slot


def test_connections_per_worker_are_bounded(fakes: list[FakeWorker], balancers: list[Balancer]) -> None:
    worker = FakeWorker().start()
    fakes.append(worker)
    lb = start_balancer([worker.url], *QUIET_POLLS, env={**QUIET_ENV, "UPSTREAM_MAX_CONNECTIONS": "2"})
    balancers.append(lb)
    status, _, body = start_pipeline(lb.url)
    assert status == 200
    instance_id = json.loads(body)
    worker.lookup_delay = 0.3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request("GET", f"{lb.url}/pipelines/status/{instance_id}"), range(8)))
    assert [a[0] for a in answers] == [200] * 8
    assert all(json.loads(a[2])["id"] == instance_id for a in answers)
    assert worker.max_lookups_in_flight == 2


def test_sigterm_closes_idle_connections_and_finishes_in_flight(fakes: list[FakeWorker]) -> None:
    worker = FakeWorker().start()
    fakes.append(worker)
    worker.post_delay = 1.0
    lb = start_balancer([worker.url], "--shutdown-grace", "5", env={"FRONT": "fast"})
    try:
        with Raw(lb.url) as idle, Raw(lb.url) as busy:
            idle.request("GET", "/healthz")
            assert idle.read().status == 200
            busy.request("POST", "/pipelines/object_detection/person_vehicle_bike", body=b'{"source": {}}')
            deadline = time.monotonic() + 5
            while worker.starts_received == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            lb.signal(signal.SIGTERM)
            assert idle.closed_by_peer()
            answer = busy.read()
            assert answer.status == 200 and answer.header("Connection") == "close"
            assert len(answer.json()) == 32
        assert lb.wait(10) == 0
    finally:
        lb.stop()
