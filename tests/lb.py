"""Starting the real ``pipeline-balancer serve`` process for end-to-end tests, and small HTTP helpers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.procs import Proc, balancer_cmd, free_port, wait_http

START_PATH = "/pipelines/object_detection/person_vehicle_bike"
FILE_SOURCE = {"source": {"uri": "file:///videos/cars.mp4", "type": "uri"}, "parameters": {"detection-device": "CPU"}}


class Balancer(Proc):
    url: str

    def backends(self) -> dict[str, Any]:
        return get_json(self.url + "/backends")

    def worker_states(self) -> dict[str, str]:
        return {w["name"]: w["state"] for w in self.backends()["workers"]}


def start_balancer(workers: list[str], *args: str, env: dict[str, str] | None = None, port: int | None = None,
                   wait_states: tuple[str, ...] = ("ready",)) -> Balancer:
    """Start ``serve`` on a free port and wait until every worker is in one of ``wait_states``."""
    port = port or free_port()
    cmd = balancer_cmd("serve", "--listen", f"127.0.0.1:{port}", "--workers", ",".join(workers),
                       "--poll-interval", "0.25", "--poll-timeout", "0.5", *args)
    proc = Balancer(cmd, env={"FPS_WARMUP": "0.5", "STALE_AFTER": "2", **(env or {})}, name="balancer")
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc.url + "/healthz", proc=proc.popen)
        if wait_states:
            wait_until(lambda: all(s in wait_states for s in proc.worker_states().values()), 10,
                       lambda: f"workers not {wait_states}: {proc.backends()}")
    except BaseException:
        proc.stop()  # never leave a balancer behind when a test cannot even start it
        print(proc.output()[-4000:])
        raise
    return proc


def wait_until(check: Callable[[], bool], timeout: float, describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s: {describe()}")


def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with urllib: (status, headers, body), errors included."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url: str) -> Any:
    status, _, body = request("GET", url)
    assert status == 200, (url, status, body)
    return json.loads(body)


def start_pipeline(base: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    return request("POST", base + START_PATH, FILE_SOURCE if body is None else body)
