"""The fast front refuses what it must, against the real ``serve`` process: request smuggling, malformed
requests, oversized heads and bodies, slow and idle clients, too many connections. Every refusal is a
short JSON answer and a closed connection; nothing refused ever reaches the worker."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakeworker import FakeWorker
from tests.lb import START_PATH, Balancer, request, start_balancer, wait_until
from tests.rawhttp import Raw

BODY = b'{"source": {"uri": "file:///x.mp4", "type": "uri"}}'


@pytest.fixture(scope="module")
def worker() -> Iterator[FakeWorker]:
    fake = FakeWorker().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def lb(worker: FakeWorker) -> Iterator[Balancer]:
    proc = start_balancer([worker.url], env={"FRONT": "fast", "HEADER_TIMEOUT": "1", "KEEPALIVE_TIMEOUT": "1.5",
                                             "MAX_HEADER_BYTES": "4096", "MAX_BODY_BYTES": "1000"})
    yield proc
    assert "Traceback" not in proc.output()
    proc.stop()


def refused(lb: Balancer, data: bytes) -> tuple[int, dict[str, str], bool]:
    """Send raw bytes: (status, JSON body, whether the balancer then closed the connection)."""
    with Raw(lb.url) as raw:
        raw.send(data)
        answer = raw.read()
        assert answer.header("Content-Type") == "application/json"
        assert answer.header("Connection") == "close"
        return answer.status, answer.json(), raw.closed_by_peer()


SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /pipelines/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "two content-lengths": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd", 400),
    "content-length list": (b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd", 400),
    "negative content-length": (b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "invalid chunk size": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n", 400),
    "chunk size overflow": (b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"fffffffffffffffffff\r\nabcd\r\n0\r\n\r\n", 400),
    "chunk size with bare LF": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\nabcd\n0\n\n", 400),
    "transfer-encoding twice": (b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "transfer-encoding chunked, identity": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "transfer-encoding not chunked": (
        b"POST /pipelines/a/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "transfer-encoding in HTTP/1.0": (
        b"POST /pipelines/a/b HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n", 400),
    "obs-fold": (b"GET /pipelines HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare LF line ends": (b"GET /pipelines HTTP/1.1\nHost: x\n\n", 400),
    "space before colon": (b"GET /pipelines HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd", 400),
    "control character in a value": (b"GET /pipelines HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_attempts_are_refused_and_never_forwarded(lb: Balancer, worker: FakeWorker, name: str) -> None:
    data, status = SMUGGLING[name]
    before = forwarded(worker)
    got, body, closed = refused(lb, data)
    assert (got, closed) == (status, True), body
    assert isinstance(body["error"], str) and "Traceback" not in body["error"]
    assert forwarded(worker) == before


def forwarded(worker: FakeWorker) -> int:
    """Requests the worker received other than the health poller's status polls."""
    return sum(n for key, n in worker.requests.items() if key != "GET /pipelines/status")


MALFORMED = {
    "garbage": (b"HELLO\r\n\r\n", 400),
    "lowercase method": (b"get /pipelines HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "space in target": (b"GET /pipe lines HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "NUL in target": (b"GET /pipe\x00lines HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "unknown version": (b"GET /pipelines HTTP/1.7\r\nHost: x\r\n\r\n", 400),
    "HTTP/2.0 in HTTP/1 syntax": (b"GET /pipelines HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "no Host in HTTP/1.1": (b"GET /pipelines HTTP/1.1\r\n\r\n", 400),
    "two Host headers": (b"GET /pipelines HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "empty header name": (b"GET /pipelines HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_get_400(lb: Balancer, name: str) -> None:
    data, status = MALFORMED[name]
    got, body, closed = refused(lb, data)
    assert (got, closed) == (status, True), body


def test_requests_after_a_refused_one_are_not_served(lb: Balancer, worker: FakeWorker) -> None:
    """A bad request pipelined behind a good one: the good one is answered, then 400, then nothing."""
    starts = worker.starts_received
    with Raw(lb.url) as raw:
        raw.send(f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\nPOST {START_PATH} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        assert raw.read().status == 200
        assert raw.read().status == 400
        assert raw.closed_by_peer()
    assert worker.starts_received == starts


def test_oversized_heads(lb: Balancer) -> None:
    many = "".join(f"X-H{i}: {'v' * 50}\r\n" for i in range(100)).encode()
    assert refused(lb, b"GET /pipelines HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")[:1] == (431,)
    long_value = b"X-Big: " + b"v" * 5000 + b"\r\n"
    assert refused(lb, b"GET /pipelines HTTP/1.1\r\nHost: x\r\n" + long_value + b"\r\n")[:1] == (431,)
    assert refused(lb, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")[:1] == (414,)


def test_a_header_line_that_never_ends_is_cut_off(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(b"GET /pipelines HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(10):
            try:
                raw.send(b"v" * 1000)
            except OSError:
                break
            time.sleep(0.01)
        answer = raw.read()
        assert answer.status == 431
        assert raw.closed_by_peer()


def test_oversized_bodies(lb: Balancer, worker: FakeWorker) -> None:
    starts = worker.starts_received
    big = b'{"x": "' + b"a" * 2000 + b'"}'
    assert refused(lb, f"POST {START_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n".encode()
                   + big)[:1] == (413,)
    chunked = b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    assert refused(lb, f"POST {START_PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                   + chunked)[:1] == (413,)
    # urllib sends the whole body before it reads: lingering close lets it see the 413, not a reset
    assert request("POST", lb.url + START_PATH, b"x" * 50_000)[0] == 413
    assert worker.starts_received == starts


def test_slowloris_gets_408_and_is_closed(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(b"GET /pipelines HTTP/1.1\r\n")
        for part in (b"Host: x\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n"):
            time.sleep(0.4)
            try:
                raw.send(part)
            except OSError:
                break
        answer = raw.read()
        assert answer.status == 408 and answer.json()["error"]
        assert raw.closed_by_peer()


def test_slow_body_gets_408(lb: Balancer) -> None:
    with Raw(lb.url) as raw:
        raw.send(f"POST {START_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:5])
        assert raw.read().status == 408
        assert raw.closed_by_peer()


def test_silent_and_idle_connections_are_closed(lb: Balancer) -> None:
    with Raw(lb.url) as silent:
        assert silent.closed_by_peer()  # never sent a byte: closed after the header timeout, no answer
    with Raw(lb.url) as idle:
        idle.request("GET", "/healthz")
        assert idle.read().status == 200
        assert idle.closed_by_peer()  # idle past the keep-alive timeout


def test_client_that_vanishes_mid_request_leaves_nothing_behind(lb: Balancer, worker: FakeWorker) -> None:
    for data in (b"GET /pipelines HTTP/1.1\r\nHost: x\r\n", f"POST {START_PATH} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {len(BODY)}\r\n\r\n{BODY.decode()[:5]}".encode()):
        host, port = lb.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # reset
    assert request("GET", lb.url + "/healthz")[0] == 200


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_limit(worker: FakeWorker) -> None:
    """Thousands of idle connections: the excess is answered 503 and closed; the process keeps serving."""
    lb = start_balancer([worker.url], env={"FRONT": "fast", "MAX_CONNECTIONS": "500"})
    host, port = lb.url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    try:
        for _ in range(500):
            held.append(socket.create_connection((host, int(port)), timeout=5))
        extra = [Raw(lb.url) for _ in range(1500)]
        statuses = []
        for raw in extra[:20]:
            answer = raw.read()
            statuses.append((answer.status, answer.json()["error"], raw.closed_by_peer()))
        assert statuses == [(503, "too many connections", True)] * 20
        # refused clients that never close do not hold the balancer's descriptors: it lingers, then closes
        wait_until(lambda: open_fds(lb.pid) < 500 + 100, 15, lambda: f"{open_fds(lb.pid)} descriptors open")
        for raw in extra:
            raw.close()
        for sock in held[:10]:
            sock.close()
        held = held[10:]
        wait_until(lambda: request("GET", lb.url + "/healthz")[0] == 200, 5)  # once the closes are seen
        status, _, body = request("GET", lb.url + "/pipelines")
        assert status == 200 and json.loads(body)[0]["name"] == "object_detection"
    finally:
        for sock in held:
            sock.close()
        lb.stop()


def held_by_process(local_port: int, remote_port: int) -> bool:
    """Whether a process still holds the loopback TCP socket local_port -> remote_port (an orphaned socket the
    kernel is still flushing has inode 0)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return inode != 0
    return False


def test_client_that_half_closes_and_never_reads_is_cut_off(worker: FakeWorker) -> None:
    """A last answer (``Connection: close``) larger than the socket buffers, to a client that half-closed and
    reads nothing: the balancer cannot flush it, so after the keep-alive timeout it lets the connection go
    instead of holding it (and its buffer) for ever."""
    entry = {"id": "0" * 32, "state": "RUNNING", "avg_fps": 30.0, "elapsed_time": 1.0, "message": "x" * 200}
    lb = start_balancer([worker.url], "--poll-interval", "30",
                        env={"FRONT": "fast", "KEEPALIVE_TIMEOUT": "1", "STALE_AFTER": "60", "POLL_TIMEOUT": "5"})
    try:
        worker.status_body = json.dumps([entry] * 60_000).encode()  # ~16 MB merged answer
        host, port = lb.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /pipelines/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            client_port = sock.getsockname()[1]
            wait_until(lambda: held_by_process(int(port), client_port), 5)  # accepted
            wait_until(lambda: not held_by_process(int(port), client_port), 15)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")  # it was answering, not refusing
        assert request("GET", lb.url + "/healthz")[0] == 200
    finally:
        worker.status_body = None
        lb.stop()
