"""End to end: two (then three) ``pipeline-balancer serve --kubernetes --ha`` processes elect a leader on a
Lease in the fake API server, in front of simulated workers whose pods point at 127.0.0.2 and 127.0.0.3.

Short lease settings (3 s lease, 2 s renew deadline, 0.3 s retry) keep it quick; the rules are the same as
with the defaults (15/10/2).
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import WorkerFactory
from tests.fakekube import FakeKubeThread
from tests.lb import START_PATH, Balancer, request, start_pipeline, wait_until
from tests.procs import balancer_cmd, free_port, wait_http
from tests.test_kube_e2e import worker_port

pytestmark = pytest.mark.timeout(90)
HOSTS = ["127.0.0.2", "127.0.0.3"]
LEASE, RETRY = 3, 0.3
LIMIT = 2  # MAX_RUNNING_PIPELINES per worker


@pytest.fixture
def kube() -> Iterator[FakeKubeThread]:
    server = FakeKubeThread()
    yield server
    server.close()


def serve_ha(kubeconfig: Path, port: int, name: str) -> Balancer:
    listen = free_port()
    cmd = balancer_cmd("serve", "--kubernetes", "--ha", "--namespace", "pipeline-server", "--worker-port", str(port),
                       "--listen", f"127.0.0.1:{listen}", "--poll-interval", "0.25", "--poll-timeout", "0.5")
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAME": name, "HA_LEASE_DURATION": str(LEASE),
           "HA_RENEW_DEADLINE": "2", "HA_RETRY_PERIOD": str(RETRY), "MAX_RUNNING_PIPELINES": str(LIMIT),
           "WATCH_BACKOFF_MIN": "0.1", "WATCH_BACKOFF_MAX": "0.3", "STALE_AFTER": "2", "SHUTDOWN_GRACE": "2"}
    proc = Balancer(cmd, env=env, name=name)
    proc.url = f"http://127.0.0.1:{listen}"
    return proc


def ready(lb: Balancer) -> tuple[int, dict[str, str]]:
    status, _, body = request("GET", lb.url + "/readyz", timeout=2.0)
    return status, json.loads(body)


def metric(lb: Balancer, name: str) -> float:
    text = request("GET", lb.url + "/metrics")[2].decode()
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def start_id(lb: Balancer) -> tuple[str, str]:
    status, headers, body = start_pipeline(lb.url)
    assert status == 200, body
    return headers["X-Pipeline-Worker"], json.loads(body)


def show(*lbs: Balancer) -> str:
    return "\n".join(f"--- {lb.name}\n{lb.output()[-3000:]}" for lb in lbs)


def test_one_leader_serves_a_killed_one_is_replaced_and_a_terminated_one_hands_over(
    kube: FakeKubeThread, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    port = worker_port()
    for host in HOSTS:
        start_worker("--noise", "0", host=host, port=port)
    kube.add_pod("ps-cpu-worker-a", ip=HOSTS[0], ready=True, owner="ps-cpu-worker")
    kube.add_pod("ps-cpu-worker-b", ip=HOSTS[1], ready=True, owner="ps-cpu-worker")
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")

    a, b = serve_ha(kubeconfig, port, "balancer-a"), serve_ha(kubeconfig, port, "balancer-b")
    lbs = [a, b]
    try:
        for lb in (a, b):
            wait_http(lb.url + "/healthz", proc=lb.popen)

        # Exactly one is ready, and stays the only one over many renewals.
        wait_until(lambda: sorted(ready(lb)[0] for lb in (a, b)) == [200, 503], 10, lambda: show(a, b))
        leader, standby = (a, b) if ready(a)[0] == 200 else (b, a)
        for _ in range(8):
            assert [ready(lb)[0] for lb in (leader, standby)] == [200, 503]
            time.sleep(0.15)
        lease = kube.lease("pipeline-balancer")
        assert lease is not None and lease["spec"]["holderIdentity"] == leader.name
        assert lease["spec"]["leaseDurationSeconds"] == LEASE
        assert ready(standby)[1] == {"ready": False, "reason": f"standby: lease held by {leader.name}"}

        # The standby refuses pipeline routes (admission must happen in one place) but answers admin routes.
        status, headers, body = start_pipeline(standby.url)
        assert status == 503 and headers["Retry-After"] == "2"
        assert json.loads(body) == {"error": "standby replica", "leader": leader.name, "replica": standby.name,
                                    "reason": f"standby: lease held by {leader.name}"}
        assert request("GET", standby.url + "/pipelines/status")[0] == 503
        ha = standby.backends()["ha"]
        assert (ha["enabled"], ha["identity"], ha["leader"], ha["is_leader"], ha["serving"]) == (
            True, standby.name, leader.name, False, False)
        assert (metric(leader, "pipeline_balancer_leader"), metric(standby, "pipeline_balancer_leader")) == (1, 0)
        assert metric(leader, "pipeline_balancer_leader_transitions_total") == 1

        # Starts through the leader; the warm standby learns them (and their owners) from its own polls.
        wait_until(lambda: set(leader.worker_states().values()) == {"ready"} and len(leader.worker_states()) == 2,
                   10, lambda: str(leader.backends()))
        started = [start_id(leader) for _ in range(2)]
        assert {w for w, _ in started} == {"ps-cpu-worker-a", "ps-cpu-worker-b"}
        wait_until(lambda: standby.backends()["instances_known"] == 2, 5, lambda: str(standby.backends()))

        # SIGKILL the leader: no release. The standby takes over once the lease is a lease period old.
        killed_at = time.monotonic()
        leader.signal(signal.SIGKILL)
        leader.wait(5)
        wait_until(lambda: ready(standby)[0] == 200, 10, lambda: show(standby))
        took = time.monotonic() - killed_at
        print(f"takeover after SIGKILL: {took:.2f} s (lease {LEASE} s, retry {RETRY} s)")
        assert LEASE - RETRY - 0.2 <= took <= LEASE + 2.0, took
        lease = kube.lease("pipeline-balancer")
        assert lease is not None and lease["spec"]["holderIdentity"] == standby.name
        assert lease["spec"]["leaseTransitions"] == 1

        # The new leader serves the old leader's instances (owners rebuilt from the workers' lists)…
        for worker, instance in started:
            status, headers, _ = request("GET", standby.url + f"/pipelines/status/{instance}")
            assert status == 200 and headers["X-Pipeline-Worker"] == worker
        # …and admits exactly the free slots: 2 workers x 2, 2 taken through the old leader.
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: start_pipeline(standby.url)[0], range(6)))
        assert Counter(answers) == {200: 2 * LIMIT - len(started), 503: 6 - (2 * LIMIT - len(started))}
        assert standby.backends()["ha"]["terms"] == 1

        # A third replica joins as the standby; SIGTERM on the leader hands over at once (released lease).
        c = serve_ha(kubeconfig, port, "balancer-c")
        lbs.append(c)
        wait_http(c.url + "/healthz", proc=c.popen)
        wait_until(lambda: c.backends()["ha"]["leader"] == standby.name, 10, lambda: show(c))
        assert ready(c)[0] == 503
        wait_until(lambda: c.backends()["instances_known"] == 2 * LIMIT, 5, lambda: str(c.backends()))
        terminated_at = time.monotonic()
        standby.signal(signal.SIGTERM)
        wait_until(lambda: ready(c)[0] == 200, 10, lambda: show(standby, c))
        handover = time.monotonic() - terminated_at
        print(f"handover after SIGTERM: {handover:.2f} s")
        assert handover < LEASE - RETRY - 0.5, handover  # far sooner than waiting the lease out
        assert standby.wait(10) == 0
        assert "released the lease" in standby.output()
        lease = kube.lease("pipeline-balancer")
        assert lease is not None and lease["spec"]["holderIdentity"] == c.name
        assert lease["spec"]["leaseTransitions"] == 2

        # Instances started through the first leader still answer, and stop, through the third.
        worker, instance = started[0]
        status, headers, _ = request("DELETE", c.url + f"{START_PATH}/{instance}")
        assert status == 200 and headers["X-Pipeline-Worker"] == worker
    except BaseException:
        print(show(*lbs))
        raise
    finally:
        for lb in lbs:
            lb.stop()
