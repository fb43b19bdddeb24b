"""The fast front's HTTP/1.1 framing, against the real ``serve`` process: keep-alive, pipelining, chunked
bodies both ways, Expect: 100-continue, HEAD/204/304, HTTP/1.0, and admin routes identical on both fronts."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakeworker import FakeWorker
from tests.lb import START_PATH, Balancer, start_balancer
from tests.rawhttp import Raw

START_BODY = json.dumps({"source": {"uri": "file:///videos/cars.mp4", "type": "uri"},
                         "parameters": {"detection-device": "CPU"}}).encode()


@pytest.fixture(scope="module")
def worker() -> Iterator[FakeWorker]:
    fake = FakeWorker().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def lb(worker: FakeWorker) -> Iterator[Balancer]:
    proc = start_balancer([worker.url], env={"FRONT": "fast"})
    yield proc
    proc.stop()


def test_keep_alive_serves_many_requests_on_one_connection(lb: Balancer) -> None:
    host, port = lb.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert (first.status, json.loads(first.read())) == (200, {"status": "ok"})
        sock = conn.sock
        conn.request("GET", "/pipelines")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())[0]["name"] == "object_detection"
        conn.request("POST", START_PATH, START_BODY, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())) == 32
        conn.request("GET", "/no/such/route")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (404, {"error": "not found"})
        assert conn.sock is sock, "the connection was not kept alive"
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        host = raw.host
        raw.send(
            f"GET /pipelines HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"POST {START_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(START_BODY)}\r\n\r\n".encode()
            + START_BODY
            + f"GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        answers = [raw.read() for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 200, 404]
        assert answers[0].json()[0]["name"] == "object_detection"
        assert answers[1].json() == {"status": "ok"}
        assert len(answers[2].json()) == 32
        raw.request("GET", "/healthz")  # still open afterwards
        assert raw.read().status == 200


def test_chunked_request_body_reaches_the_worker_whole(lb: Balancer, worker: FakeWorker) -> None:
    chunks = [START_BODY[:10], START_BODY[10:40], START_BODY[40:]]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    before = len(worker.starts_seen)
    with Raw(lb.url) as raw:
        raw.send(f"POST {START_PATH} HTTP/1.1\r\nHost: {raw.host}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode() + encoded)
        answer = raw.read()
    assert answer.status == 200, answer
    headers, body = worker.starts_seen[before]
    assert body == START_BODY
    assert headers["content-length"] == str(len(START_BODY))
    assert "transfer-encoding" not in headers


def test_chunked_request_with_trailer_fields_drops_them(lb: Balancer, worker: FakeWorker) -> None:
    before = len(worker.starts_seen)
    with Raw(lb.url) as raw:
        raw.send(f"POST {START_PATH} HTTP/1.1\r\nHost: {raw.host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + b"%x\r\n%s\r\n0\r\nX-Trailer: sneaky\r\nHost: evil\r\n\r\n" % (len(START_BODY), START_BODY))
        assert raw.read().status == 200
    headers, body = worker.starts_seen[before]
    assert body == START_BODY and "x-trailer" not in headers


def test_chunked_worker_answer_is_passed_whole(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.request("GET", "/pipelines/object_detection/person_vehicle_bike")
        answer = raw.read()
    assert answer.status == 200
    assert answer.json() == {"name": "object_detection", "version": "person_vehicle_bike"}
    assert answer.header("Transfer-Encoding") is None
    assert answer.header("Content-Length") == str(len(answer.body))


def test_expect_100_continue(lb: Balancer, worker: FakeWorker) -> None:
    before = len(worker.starts_seen)
    with Raw(lb.url) as raw:
        raw.send(f"POST {START_PATH} HTTP/1.1\r\nHost: {raw.host}\r\nExpect: 100-continue\r\n"
                 f"Content-Length: {len(START_BODY)}\r\n\r\n".encode())
        interim = raw.read()
        assert (interim.status, interim.body) == (100, b"")
        raw.send(START_BODY)
        assert raw.read().status == 200
    headers, body = worker.starts_seen[before]
    assert body == START_BODY and "expect" not in headers


def test_expect_with_a_body_too_large_gets_413_without_100(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(f"POST {START_PATH} HTTP/1.1\r\nHost: {raw.host}\r\nExpect: 100-continue\r\n"
                 "Content-Length: 1000000\r\n\r\n".encode())
        answer = raw.read()
        assert answer.status == 413 and "error" in answer.json()
        assert raw.closed_by_peer()


def test_unknown_expectation_is_417(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.request("POST", START_PATH, {"Expect": "something-else"}, START_BODY)
        assert raw.read().status == 417
        assert raw.closed_by_peer()


def test_head_has_no_body_and_keeps_the_connection_usable(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.request("HEAD", "/healthz")
        answer = raw.read(head=True)
        assert answer.status == 200 and answer.header("Content-Length") == str(len(b'{\n "status": "ok"\n}\n'))
        raw.request("HEAD", "/pipelines")
        answer = raw.read(head=True)
        assert answer.status == 200
        raw.request("GET", "/healthz")  # would read stray body bytes as a status line if any had been sent
        assert raw.read().json() == {"status": "ok"}


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_from_the_worker(lb: Balancer, worker: FakeWorker, status: int) -> None:
    worker.models_status = status
    try:
        with Raw(lb.url) as raw:
            raw.request("GET", "/models")
            answer = raw.read()
            assert answer.status == status and answer.header("Content-Length") is None
            assert answer.header("ETag") == '"m1"'
            raw.request("GET", "/healthz")
            assert raw.read().json() == {"status": "ok"}
    finally:
        worker.models_status = 200


def test_http10_closes_unless_keep_alive_is_asked(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = raw.read()
        assert answer.status == 200 and answer.header("Connection") == "close"
        assert raw.closed_by_peer()
    with Raw(lb.url) as raw:
        raw.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = raw.read()
        assert answer.status == 200 and answer.header("Connection") == "keep-alive"
        raw.send(b"GET /pipelines HTTP/1.0\r\n\r\n")
        assert raw.read().status == 200
        assert raw.closed_by_peer()


def test_connection_close_is_honoured(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.request("GET", "/pipelines", {"Connection": "close"})
        answer = raw.read()
        assert answer.status == 200 and answer.header("Connection") == "close"
        assert raw.closed_by_peer()


def test_half_closed_client_still_gets_its_answers(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(f"GET /pipelines HTTP/1.1\r\nHost: {raw.host}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: {raw.host}"
                 "\r\n\r\n".encode())
        raw.sock.shutdown(socket.SHUT_WR)
        assert [raw.read().status for _ in range(2)] == [200, 200]
        assert raw.closed_by_peer()


def test_curl_and_aiohttp_clients(lb: Balancer) -> None:
    import subprocess

    out = subprocess.run(["curl", "-sS", "-v", "--http1.1", "-H", "Content-Type: application/json",
                          "--data-binary", START_BODY.decode(), "-H", "Transfer-Encoding: chunked",
                          f"{lb.url}{START_PATH}", "--next", f"{lb.url}/healthz"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[0], "".join(out.stdout.splitlines()[1:])
    assert len(json.loads(first)) == 32 and json.loads(second) == {"status": "ok"}
    assert "Re-using existing connection" in out.stderr

    async def many() -> list[int]:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(20):
                async with session.get(lb.url + "/pipelines") as resp:
                    await resp.read()
                    statuses.append(resp.status)
            return statuses

    import asyncio

    assert asyncio.run(many()) == [200] * 20


# ---- admin routes: the same on both fronts ---------------------------------------------------------------
@pytest.fixture(scope="module")
def both_fronts(worker: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Balancer]]:
    token = Path(tmp_path_factory.mktemp("token")) / "token"
    token.write_text("s3cret\n")
    procs = {front: start_balancer([worker.url], "--admin-token-file", str(token), env={"FRONT": front},
                                   wait_states=()) for front in ("fast", "aiohttp")}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.mark.parametrize("path,auth", [("/healthz", None), ("/readyz", None), ("/backends", None),
                                       ("/backends", "Bearer wrong"), ("/backends", "Bearer s3cret"),
                                       ("/metrics", None), ("/metrics", "Bearer s3cret")])
def test_admin_routes_are_identical_on_both_fronts(both_fronts: dict[str, Balancer], path: str,
                                                   auth: str | None) -> None:
    seen = {}
    for front, proc in both_fronts.items():
        with Raw(proc.url) as raw:
            raw.request("GET", path, {"Authorization": auth} if auth else {})
            answer = raw.read()
        shape: object = answer.body if path in ("/healthz", "/readyz") or answer.status == 401 else (
            sorted(answer.json()) if path == "/backends" else answer.body.splitlines()[0])
        seen[front] = (answer.status, answer.header("Content-Type"), answer.header("WWW-Authenticate"), shape)
    assert seen["fast"] == seen["aiohttp"]
    assert seen["fast"][0] == (401 if path in ("/backends", "/metrics") and auth != "Bearer s3cret" else 200)
