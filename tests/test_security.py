"""Security, end to end on the real ``serve`` process: the admin bearer token (read from a file laid out as
Kubernetes mounts a Secret), the separate admin port, and credentials never reaching the logs."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fakeworker import FakeWorker
from tests.lb import START_PATH, Balancer, request, start_balancer, wait_until
from tests.procs import free_port

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cr3t-admin-token-7f9c"


@pytest.fixture
def fake() -> Iterator[FakeWorker]:
    worker = FakeWorker().start()
    yield worker
    worker.stop()


def secret_volume(root: Path, key: str, value: str) -> Path:
    """A Secret volume as the kubelet writes it: ``key -> ..data/key``, ``..data -> ..<timestamp>/``."""
    stamped = root / "..2026_11_28_10_00_00.000000001"
    stamped.mkdir(parents=True)
    (stamped / key).write_text(value)
    os.symlink(stamped.name, root / "..data")
    os.symlink(f"..data/{key}", root / key)
    return root / key


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_token_from_a_mounted_secret(fake: FakeWorker, tmp_path: Path) -> None:
    token_file = secret_volume(tmp_path / "admin-token", "token", TOKEN + "\n")  # a trailing newline, as kubectl
    lb = start_balancer([fake.url], "--admin-token-file", str(token_file), wait_states=())
    try:
        wait_until(lambda: request("GET", lb.url + "/backends", headers=auth(TOKEN))[0] == 200, 10)
        for path in ("/backends", "/metrics"):
            status, headers, body = request("GET", lb.url + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (path, status)
            assert fake.url.encode() not in body and b"127.0.0.1" not in body
            for wrong in ("wrong", TOKEN + "x", TOKEN[:-1], ""):
                assert request("GET", lb.url + path, headers=auth(wrong))[0] == 401
            assert request("GET", lb.url + path, headers={"Authorization": TOKEN})[0] == 401, "scheme required"
            status, _, body = request("GET", lb.url + path, headers=auth(TOKEN))
            assert status == 200 and fake.url.split("//")[1].encode() in body
        # probes and the pipeline API need no token
        assert request("GET", lb.url + "/healthz")[0] == 200
        assert request("GET", lb.url + "/readyz")[0] == 200
        assert request("GET", lb.url + "/pipelines")[0] == 200
        assert TOKEN not in lb.output()
    finally:
        lb.stop()


def test_admin_port_serves_backends_and_metrics_and_the_api_port_does_not(fake: FakeWorker, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    lb = start_balancer([fake.url], "--admin-listen", f"127.0.0.1:{admin_port}", "--admin-token-file",
                        str(token_file), wait_states=())
    try:
        wait_until(lambda: request("GET", admin + "/backends", headers=auth(TOKEN))[0] == 200, 10)
        before = sum(fake.requests.values()) - fake.requests["GET /pipelines/status"]
        for path in ("/backends", "/metrics"):
            status, headers, body = request("GET", lb.url + path, headers=auth(TOKEN))
            assert status == 404 and b"127.0.0.1" not in body, (path, status, body)
            assert "X-Pipeline-Worker" not in headers, "not forwarded to a worker either"
            assert request("GET", admin + path)[0] == 401
            status, _, body = request("GET", admin + path, headers=auth(TOKEN))
            assert status == 200 and b"127.0.0.1" in body
        assert sum(fake.requests.values()) - fake.requests["GET /pipelines/status"] == before
        # probes stay on the API port (Kubernetes probes it); the API is not served on the admin port
        assert request("GET", lb.url + "/healthz")[0] == 200 and request("GET", lb.url + "/readyz")[0] == 200
        assert request("GET", lb.url + "/pipelines")[0] == 200
        assert request("GET", admin + "/pipelines", headers=auth(TOKEN))[0] == 404
        assert json.loads(request("GET", admin + "/backends", headers=auth(TOKEN))[2])["workers"]
    finally:
        lb.stop()


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_a_bad_token_file_stops_the_start_with_a_clear_error(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "token"
    if problem == "empty":
        path.write_text("\n")
    out = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--workers", "http://127.0.0.1:9",
                  "--admin-token-file", str(path), timeout=20)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and str(path) in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_never_carry_credentials_or_request_bodies(fake: FakeWorker, fmt: str) -> None:
    """A start whose source URI has a password, a worker error that echoes it, a worker URL with credentials,
    a broken worker, and a malformed request line holding a URI with a password: none of the passwords and
    no request body reach the log, at DEBUG level, in either format."""
    fake.start_error_echo = True
    dead = f"http://svc:w0rkerpa55@127.0.0.1:{free_port()}"  # nobody listens: connection errors name the URL
    lb: Balancer = start_balancer([f"http://svc:w0rkerpa55@{fake.url.removeprefix('http://')}", dead],
                                  "--log-level", "DEBUG", "--log-format", fmt, wait_states=("ready", "unhealthy"))
    try:
        source = "rtsp://admin:cam3ra-pa55@10.1.2.3:554/stream1"
        body = {"source": {"uri": source, "type": "uri"}, "tags": {"marker": "body-marker-4711"}}
        status, _, reply = request("POST", lb.url + START_PATH, body)
        assert status == 400 and "cam3ra-pa55" in json.loads(reply), "the worker's answer reaches the client"
        fake.start_error_echo, fake.post_close = False, True
        status, _, _ = request("POST", lb.url + START_PATH, body)
        assert status == 502
        host, port = lb.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET /pipelines/\x01?u=rtsp://bob:linepa55@cam/x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.")
        wait_until(lambda: "unreachable" in lb.output() or "broken" in lb.output(), 5)
    finally:
        lb.stop()
    log = lb.output()
    for secret in ("cam3ra-pa55", "w0rkerpa55", "linepa55", "body-marker-4711"):
        assert secret not in log, f"{secret} in the log:\n{log[-3000:]}"
    assert "***@" in log, "worker URLs were logged, redacted"
    assert "Traceback" not in log
    if fmt == "json":
        lines = [line for line in log.splitlines() if line.startswith("{")]
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
