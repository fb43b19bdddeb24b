"""Bad input against the real ``serve`` process: every bad request gets a clear error, never a traceback, a
hang, or a started pipeline; and the state is consistent afterwards (no reservation held, no worker made
unhealthy by a client). HTTP-protocol-level cases (smuggling, pipelining, 431/413 …) are in tests/test_http_*.py.

Bounds carry ``SLACK`` seconds for a noisy shared machine.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.config import ServerSettings
from tests.fakeworker import FakeWorker
from tests.lb import START_PATH, Balancer, get_json, start_balancer, wait_until
from tests.procs import Proc, balancer_cmd, free_port, wait_http

pytestmark = pytest.mark.timeout(120)
SLACK = 3.0


@dataclass
class Rig:
    sim: str
    """A simulated worker (the real server's validation and error shapes)."""
    lb: Balancer
    """The balancer in front of the simulated worker only."""
    fakes: list[FakeWorker]
    """Two counting workers."""
    lb_fakes: Balancer
    """The balancer in front of the counting workers only."""


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    port = free_port()
    sim = Proc(balancer_cmd("worker", "--listen", f"127.0.0.1:{port}", "--noise", "0"), name="worker")
    fakes = [FakeWorker().start(), FakeWorker().start()]
    lbs: list[Balancer] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/pipelines")
        lbs.append(start_balancer([f"http://127.0.0.1:{port}"], env={"PENDING_TIMEOUT": "2", "HEADER_TIMEOUT": "1"}))
        lbs.append(start_balancer([f.url for f in fakes]))
        yield Rig(f"http://127.0.0.1:{port}", lbs[0], fakes, lbs[1])
    finally:
        for lb in lbs:
            lb.stop()
        for f in fakes:
            f.stop()
        sim.stop()


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request sent exactly as given (http.client does not normalise the path)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def assert_balancer_error(status: int, headers: dict[str, str], body: bytes) -> None:
    """A 5xx is the balancer's JSON error about a worker, never a traceback or a bare 500."""
    assert b"Traceback" not in body and b"Server got itself in trouble" not in body, body[:300]
    assert status != 500, body[:300]
    if status >= 500:
        assert status in (502, 503, 504), status
        assert "error" in json.loads(body), body[:300]


def assert_consistent(rig: Rig) -> None:
    for lb in (rig.lb, rig.lb_fakes):
        wait_until(lambda lb=lb: all(w["reserved"] == 0 for w in lb.backends()["workers"]), 2 + 1 + SLACK,
                   lambda lb=lb: str(lb.backends()["workers"]))
        assert all(w["state"] in ("ready", "full") for w in lb.backends()["workers"]), lb.backends()
        assert "Traceback" not in lb.output(), lb.output()[-3000:]


def sim_instances(rig: Rig) -> int:
    return len(get_json(rig.sim + "/pipelines/status"))


# ---- start bodies ----------------------------------------------------------------------------------------

BAD_BODIES: list[tuple[bytes, str]] = [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"null", "application/json"),
    (b'"a string"', "application/json"),
    (b"[1, 2]", "application/json"),
    (b'{"source": 5, "destination": []}', "application/json"),
    (b"[" * 60_000, "application/json"),  # deep nesting: once a RecursionError (500) in the balancer
    (b'{"a":' * 9_000 + b"1" + b"}" * 9_000, "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b'{"source": {"uri": "file:///x", "type": "uri"}}', "text/plain"),
    (json.dumps({"source": {"type": "uri", "uri": "file:///x"}, "parameters": {"detection-device": 5}}).encode(),
     "application/json"),
]


def test_bad_start_bodies_get_the_workers_error_and_hold_no_slot(rig: Rig) -> None:
    before = sim_instances(rig)
    for body, content_type in BAD_BODIES:
        status, headers, reply = raw(rig.lb.url, "POST", START_PATH, body, {"Content-Type": content_type})
        assert_balancer_error(status, headers, reply)
        assert 400 <= status < 500, (body[:40], status, reply[:200])
        assert headers.get("X-Pipeline-Worker") == rig.sim, ("the worker's own answer, passed through", body[:40])
    assert sim_instances(rig) == before, "no pipeline was started"
    status, _, _ = raw(rig.lb.url, "POST", START_PATH, b"x" * 70_000, {"Content-Type": "application/json"})
    assert status == 413
    assert_consistent(rig)


# ---- routes and paths ------------------------------------------------------------------------------------

UNKNOWN_ROUTES = ["/", "/foo", "/pipelinesx", "/models/x", "/pipelines/a/b/c/d/e", "/pipelines/a/b/c/notstatus",
                  "/backends/x", "/metricsx", "/api/v1/namespaces/default/pods", "/favicon.ico"]
PATH_TRICKS = ["/pipelines/../backends", "/pipelines/./status", "/pipelines/%2e%2e/%2e%2e/etc/passwd",
               "/pipelines/a%2Fb/c", "/pipelines/a%2fb/c", "/pipelines/a%5cb/c", "/pipelines/a\\b/c",
               "//pipelines", "/pipelines//status", "/pipelines/status//", "/pipelines/status/..%2f..%2fbackends",
               "/" + "a" * 3000, "/pipelines/" + "a" * 3000, "/pipelines/status/" + "0" * 3000,
               "/pipelines/" + "0" * 32 + "%0d%0aX-Injected:%201"]
ENCODED_NEWLINES = ["/pipelines/status/" + "0" * 32 + "%0a", f"{START_PATH}/{'0' * 32}%0d%0a/status"]
"""GET/DELETE only: ``POST /pipelines/{name}/{version}`` is a start, whatever the name (the worker refuses it)."""


def test_unknown_routes_and_path_tricks_are_answered_by_the_balancer_not_forwarded(rig: Rig) -> None:
    before = {f.url: sum(f.requests.values()) for f in rig.fakes}
    polls = {f.url: f.requests["GET /pipelines/status"] for f in rig.fakes}
    for path in UNKNOWN_ROUTES:
        for method in ("GET", "POST", "DELETE"):
            status, headers, body = raw(rig.lb_fakes.url, method, path)
            assert status == 404 and json.loads(body) == {"error": "not found"}, (method, path, status, body)
            assert "X-Pipeline-Worker" not in headers
    for path in PATH_TRICKS:
        for method in ("GET", "DELETE", "POST"):
            status, headers, body = raw(rig.lb_fakes.url, method, path)
            assert_balancer_error(status, headers, body)
            assert status in (400, 404, 405, 414, 431), (method, path, status, body[:200])
            assert "X-Pipeline-Worker" not in headers, (method, path)
    for path in ENCODED_NEWLINES:
        for method in ("GET", "DELETE"):
            status, headers, body = raw(rig.lb_fakes.url, method, path)
            assert status in (400, 404, 405), (method, path, status, body[:200])
            assert "X-Pipeline-Worker" not in headers, (method, path)
    forwarded = {f.url: sum(f.requests.values()) - before[f.url]
                 - (f.requests["GET /pipelines/status"] - polls[f.url]) for f in rig.fakes}
    assert forwarded == {f.url: 0 for f in rig.fakes}, "nothing but the health polls reached the workers"
    assert_consistent(rig)


BAD_IDS = ["not-an-id", "A" * 32, "g" * 32, "0" * 31, "0" * 33, "0" * 16 + "-" * 16, "%00" * 3, "'%20OR%201=1",
           "1e100"]


def test_ids_that_cannot_be_instance_ids_are_400_without_asking_any_worker(rig: Rig) -> None:
    before = [dict(f.requests) for f in rig.fakes]
    for bad in BAD_IDS:
        for method, path, answer in (
            ("GET", f"/pipelines/status/{bad}", "Invalid instance"),
            ("GET", f"/pipelines/{bad}", "Invalid pipeline, version or instance"),
            ("DELETE", f"/pipelines/{bad}", "Invalid pipeline, version or instance"),
            ("GET", f"{START_PATH}/{bad}", "Invalid pipeline, version or instance"),
            ("GET", f"{START_PATH}/{bad}/status", "Invalid pipeline, version or instance"),
            ("DELETE", f"{START_PATH}/{bad}", "Invalid pipeline, version or instance"),
        ):
            status, headers, body = raw(rig.lb_fakes.url, method, path)
            assert (status, json.loads(body)) == (400, answer), (method, path, status, body)
            assert "X-Pipeline-Worker" not in headers
    for fake, was in zip(rig.fakes, before, strict=True):
        asked = {k: v - was.get(k, 0) for k, v in fake.requests.items() if k != "GET /pipelines/status"}
        assert not any(asked.values()), asked


def test_fan_out_for_unknown_ids_is_bounded(rig: Rig) -> None:
    """A client looping over random (well-formed) ids: at most 4 owner lookups at once reach each worker, and
    an id found unknown is not asked about again for a while (negative cache)."""
    for f in rig.fakes:
        f.lookup_delay = 0.2
        f.max_lookups_in_flight = 0
    try:
        random_ids = [uuid.uuid4().hex for _ in range(40)]
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda i: raw(rig.lb_fakes.url, "GET", f"/pipelines/status/{i}"), random_ids))
        assert all((s, json.loads(b)) == (400, "Invalid instance") for s, _, b in results), results[:3]
        for f in rig.fakes:
            assert 1 <= f.max_lookups_in_flight <= 4, f.max_lookups_in_flight
            asked = sum(v for k, v in f.requests.items() if k.startswith("GET /pipelines/status/"))
            assert asked >= 40, "each new id is asked once"
        # the same unknown id, again and again: asked once per worker
        repeated = uuid.uuid4().hex
        for _ in range(20):
            status, _, _ = raw(rig.lb_fakes.url, "GET", f"/pipelines/{repeated}")
            assert status == 400
        assert [f.requests[f"GET /pipelines/status/{repeated}"] for f in rig.fakes] == [1, 1]
    finally:
        for f in rig.fakes:
            f.lookup_delay = 0.0


# ---- connections -----------------------------------------------------------------------------------------

def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_thousands_of_idle_connections_and_slowloris_do_not_stop_other_clients(rig: Rig) -> None:
    """1500 connections that send nothing and 20 that send a header byte every 0.5 s, while other clients go on.

    The front that is the default decides what happens to them: with a connection limit and a header timeout
    (``server.max_connections``, ``server.header_timeout`` of the fast front), the slow ones are cut; the
    aiohttp front has neither, so there only "others are still served, nothing leaks" is checked.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    fields = getattr(ServerSettings, "__dataclass_fields__", {})
    front = os.environ.get("FRONT", getattr(ServerSettings(), "front", "aiohttp"))  # what `serve` will run
    fast_front = "header_timeout" in fields and front == "fast"
    host, port = rig.lb.url.removeprefix("http://").split(":")
    fds_before = _fd_count(rig.lb.pid)
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        for _ in range(1500):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        for _ in range(20):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /pipelines HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        end = time.monotonic() + 3.0
        served = 0
        while time.monotonic() < end:
            for s in slow:
                try:
                    s.sendall(b"X-a: b\r\n")
                except OSError:
                    pass  # cut by a header timeout: fine
            began = time.monotonic()
            status, _, _ = raw(rig.lb.url, "GET", "/pipelines/status", timeout=5)
            assert status == 200
            assert time.monotonic() - began < 1 + SLACK
            served += 1
            time.sleep(0.5)
        assert served >= 3
        if fast_front:  # HEADER_TIMEOUT=1: every slowloris connection was cut (408 or closed)
            for s in slow:
                s.settimeout(2 + SLACK)
                try:
                    data = s.recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
    finally:
        for s in idle + slow:
            s.close()
    # what they held is given back
    wait_until(lambda: _fd_count(rig.lb.pid) <= fds_before + 20, 10 + SLACK,
               lambda: f"{_fd_count(rig.lb.pid)} fds, {fds_before} before")
    assert raw(rig.lb.url, "GET", "/healthz")[0] == 200
    assert_consistent(rig)


# ---- property-based fuzzing ------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(["pipelines", "status", "models", "object_detection", "person_vehicle_bike", "backends",
                     "metrics", "healthz", "readyz", "..", ".", "", "%2F", "%2e", "%00", "%ff", "~", "*"]),
    st.builds(lambda: uuid.uuid1().hex),
    st.text(alphabet="abcdef0123456789", min_size=1, max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="/?#%"),
            min_size=1, max_size=30),
)
PATHS = st.builds(lambda segs, q: "/" + "/".join(segs) + (("?" + q) if q else ""),
                  st.lists(SEGMENTS, min_size=0, max_size=6),
                  st.one_of(st.none(), st.sampled_from(["state=RUNNING", "x=%00", "a=b&c", "state=BOGUS&worker=1"])))
METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "FOO", "TRACE"])
HEADER_NAMES = st.sampled_from(["Content-Type", "Accept", "X-Forwarded-For", "Authorization", "X-Custom",
                                "Accept-Encoding", "Cookie", "Range", "If-None-Match", "Origin"])
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["source", "destination", "parameters", "tags", "uri", "type", "detection-device"]),
        children, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(st.none(), st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v).encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(method=METHODS, path=PATHS, headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4), body=BODIES)
def test_fuzz_never_a_500_never_a_hang(rig: Rig, method: str, path: str, headers: dict[str, str],
                                       body: bytes | None) -> None:
    try:
        status, reply_headers, reply = raw(rig.lb.url, method, path, body, headers, timeout=10)
    except http.client.HTTPException:
        return  # e.g. HEAD bodies: http.client's own limits, not the balancer's answer
    assert_balancer_error(status, reply_headers, reply)


def test_state_is_consistent_after_fuzzing(rig: Rig) -> None:
    """Runs after the fuzz test (same module, file order): nothing is held, no worker was made unhealthy."""
    assert_consistent(rig)
    for path in ("/pipelines/status", "/pipelines", "/models"):
        status, _, _ = raw(rig.lb.url, "GET", path)
        assert status == 200

