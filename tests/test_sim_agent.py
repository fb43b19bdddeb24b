"""The seed's HAProxy availability agent served by a real worker (``--agent-port``)."""

from __future__ import annotations

import socket
import time

from tests.conftest import WorkerFactory
from tests.contract import call, expect_instance_id, expect_json, wait_until
from tests.procs import Proc, free_port

PIPELINE = "/pipelines/object_detection/person_vehicle_bike"
FILE = {"source": {"type": "uri", "uri": "file:///videos/a.mp4"}}


def ask(port: int) -> bytes:
    """Connect, send what HAProxy sends (``agent-send ping``), read until the agent closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"ping\n")
        data = b""
        while chunk := conn.recv(64):
            data += chunk
    return data


def url_of(worker: Proc) -> str:
    return str(worker.url)  # type: ignore[attr-defined]


def start(url: str) -> str:
    return expect_instance_id(call("POST", url + PIPELINE, FILE))


def test_agent_answers_0_when_running_reaches_max(start_worker: WorkerFactory) -> None:
    port = free_port()
    url = url_of(start_worker("--agent-port", str(port), "--max-running-pipelines", "2"))
    assert ask(port) == b"100%\n"
    first = start(url)
    assert ask(port) == b"100%\n"
    second = start(url)
    assert ask(port) == b"0%\n"
    start(url)  # QUEUED: not counted, still 0% because two run
    assert ask(port) == b"0%\n"
    call("DELETE", f"{url}/pipelines/{first}")  # the queued one starts: two run again
    assert ask(port) == b"0%\n"
    call("DELETE", f"{url}/pipelines/{second}")
    assert ask(port) == b"100%\n"


def test_agent_answers_0_when_a_pipeline_is_at_or_below_target_fps(start_worker: WorkerFactory) -> None:
    """TARGET_FPS from the environment: 0% as soon as one RUNNING pipeline reads <= 40 fps."""
    port = free_port()
    url = url_of(start_worker("--agent-port", str(port), "--capacity-fps", "100", "--noise", "0",
                              env={"TARGET_FPS": "40"}))
    assert ask(port) == b"100%\n"
    first = start(url)
    wait_until(lambda: ask(port) == b"100%\n", what="fps above target")  # alone at 100 fps
    time.sleep(0.5)  # 50 frames alone keep its lifetime average above 40 for the rest of the test
    others = [start(url), start(url)]  # three share 100 fps: the new ones never read above 33.4
    assert ask(port) == b"0%\n"
    rates = {e["id"]: e["avg_fps"] for e in expect_json(call("GET", url + "/pipelines/status"))}
    assert all(rates[i] <= 40 for i in others) and rates[first] > 40
    for instance_id in others:
        call("DELETE", f"{url}/pipelines/{instance_id}")
    assert ask(port) == b"100%\n"  # the first one's lifetime average is still far above 40


def test_options_win_over_the_environment(start_worker: WorkerFactory) -> None:
    port = free_port()
    url = url_of(start_worker("--agent-port", str(port), "--max-running-pipelines", "0", "--target-fps", "0",
                              env={"MAX_RUNNING_PIPELINES": "1", "TARGET_FPS": "1000"}))
    start(url)
    start(url)
    assert ask(port) == b"100%\n"
    assert [e["state"] for e in expect_json(call("GET", url + "/pipelines/status"))] == ["RUNNING", "RUNNING"]

