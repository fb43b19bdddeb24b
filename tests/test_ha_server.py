"""The server's side of HA, in process and without sockets: readiness, the standby's answer to pipeline
routes, and the poll round a new leader waits for. The election itself is driven by hand."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

from balancer.config import load_config
from balancer.leader import Create, LeaseRecord
from balancer.server import Server


class SyncedDiscovery:
    synced = True

    async def run(self, sink: Any) -> None:
        raise AssertionError("not started in these tests")

    def to_dict(self) -> dict[str, Any]:
        return {"source": "test", "synced": True}


def ha_server() -> tuple[Server, SimpleNamespace]:
    config = load_config(env={"DISCOVERY": "kubernetes", "HA_ENABLED": "true", "POD_NAME": "me",
                              "NAMESPACE": "ns", "RETRY_AFTER": "3"})
    server = Server(config, discovery=SyncedDiscovery())
    poller = SimpleNamespace(rounds_started=0, rounds_done=0, woken=0)
    poller.wake = lambda: setattr(poller, "woken", poller.woken + 1)
    server.poller = poller  # type: ignore[assignment]
    return server, poller


def win(server: Server) -> None:
    """Make the elector win the (absent) Lease now, and tell the server, as the loop does."""
    assert server.elector is not None
    election = server.elector.election
    action = election.decide(None, time.monotonic(), time.time())
    assert isinstance(action, Create)
    assert election.succeeded(action, action.record, time.monotonic())
    server.elector._notice_changes()


def test_a_standby_is_not_ready_and_answers_pipeline_routes_503() -> None:
    server, _ = ha_server()
    assert server.readiness() == (False, "standby: no leader yet")
    assert server.elector is not None
    server.elector.election.decide(LeaseRecord("other", 15, None, None, 0, "4"), time.monotonic(), time.time())
    assert server.readiness() == (False, "standby: lease held by other")
    answer = server._standby_answer()
    assert answer is not None and answer.status == 503 and ("Retry-After", "3") in answer.headers
    assert json.loads(answer.body) == {"error": "standby replica", "leader": "other", "replica": "me",
                                       "reason": "standby: lease held by other"}
    ha = server.backends()["ha"]
    assert (ha["enabled"], ha["identity"], ha["leader"], ha["is_leader"], ha["serving"]) == (
        True, "me", "other", False, False)
    metrics = server.metrics.render().decode()
    assert "pipeline_balancer_leader 0.0" in metrics
    assert "pipeline_balancer_leader_transitions_total 0.0" in metrics


def test_a_new_leader_serves_only_after_a_poll_round_that_began_after_it_won() -> None:
    server, poller = ha_server()
    poller.rounds_started, poller.rounds_done = 6, 5  # round 6 is on its way: it began before the win
    win(server)
    assert poller.woken == 1  # the next round is asked for at once
    assert server.readiness() == (False, "taking over: polling every worker first")
    poller.rounds_done = 6  # the round that began before the win ends: not enough
    assert server.readiness()[0] is False and server._standby_answer() is not None
    poller.rounds_started, poller.rounds_done = 7, 7
    assert server.readiness() == (True, "")
    assert server._standby_answer() is None
    ha = server.backends()["ha"]
    assert (ha["is_leader"], ha["serving"], ha["terms"]) == (True, True, 1)
    metrics = server.metrics.render().decode()
    assert "pipeline_balancer_leader 1.0" in metrics
    assert "pipeline_balancer_leader_transitions_total 1.0" in metrics


def test_without_ha_nothing_changes() -> None:
    server = Server(load_config(env={"WORKERS": "http://127.0.0.1:9"}), discovery=SyncedDiscovery())
    assert server.elector is None and server.standby_reason() is None
    assert server.backends()["ha"] == {"enabled": False}
    assert "pipeline_balancer_leader" not in server.metrics.render().decode()
