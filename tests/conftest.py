"""Fixtures that start real processes: simulated workers, the balancer, a Mosquitto broker."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakeworker import FakeWorker
from tests.lb import Balancer
from tests.procs import Proc, balancer_cmd, free_port, wait_http, wait_port


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[tuple[str, int]]:
    """A real Mosquitto broker on a free loopback port: ``(host, port)``."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("mosquitto is not installed: run scripts/test.sh, which installs it")
    port = free_port()
    conf = Path(tempfile.mkdtemp()) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = Proc([binary, "-c", str(conf)], name="mosquitto")
    try:
        wait_port("127.0.0.1", port)
        yield ("127.0.0.1", port)
    finally:
        proc.stop()


WorkerFactory = Callable[..., Proc]


@pytest.fixture
def start_worker(request: pytest.FixtureRequest) -> Iterator[WorkerFactory]:
    """Start simulated worker processes: ``start_worker("--capacity-fps", "130", host="127.0.0.1")``.

    The returned :class:`Proc` has ``.url``; every worker is stopped when the test ends.
    """
    procs: list[Proc] = []

    def start(*args: str, host: str = "127.0.0.1", port: int | None = None, env: dict[str, str] | None = None
              ) -> Proc:
        port = port or free_port(host)
        proc = Proc(balancer_cmd("worker", "--listen", f"{host}:{port}", *args), env=env, name="worker")
        proc.url = f"http://{host}:{port}"  # type: ignore[attr-defined]
        procs.append(proc)
        wait_http(proc.url + "/pipelines", proc=proc.popen)  # type: ignore[attr-defined]
        return proc

    yield start
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for proc in procs:
        proc.stop()
        if failed:
            print(f"--- {proc.name} {proc.args}\n{proc.output()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item so fixtures can print logs of failed tests."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``pipeline-balancer ARGS`` to completion."""
    return subprocess.run(balancer_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def balancers() -> Iterator[list[Balancer]]:
    """Balancer processes a test started (``balancers.append(start_balancer(...))``), stopped at its end."""
    started: list[Balancer] = []
    yield started
    for balancer in started:
        balancer.stop()


@pytest.fixture
def fakes() -> Iterator[list[FakeWorker]]:
    """Scriptable fake workers a test started (``fakes.append(FakeWorker().start())``), stopped at its end."""
    started: list[FakeWorker] = []
    yield started
    for fake in started:
        fake.stop()
