"""MQTT state events: pure parts, then the real ``serve`` process publishing to a real Mosquitto broker."""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from prometheus_client import CollectorRegistry

from balancer.config import MqttSettings
from balancer.events import EventPublisher, event_message, snapshot_summary
from tests.conftest import WorkerFactory
from tests.lb import Balancer, get_json, request, start_balancer, start_pipeline, wait_until
from tests.procs import Proc, free_port, wait_port


# ---- pure ------------------------------------------------------------------------------------------
def test_event_message_names_state_events_after_the_state() -> None:
    msg = event_message("state", {"worker": "w", "state": "full", "reason": "r"}, 7, 1.23456, "lb")
    assert msg == {"event": "full", "worker": "w", "state": "full", "reason": "r", "seq": 7, "time": 1.235,
                   "balancer": "lb"}
    assert event_message("joined", {"worker": "w"}, 1, 0, "lb")["event"] == "joined"


def test_queue_is_bounded_drops_oldest_and_counts() -> None:
    registry = CollectorRegistry()
    publisher = EventPublisher(MqttSettings(host="127.0.0.1:1", queue_size=3), registry, lambda: {"workers": []})
    for n in range(5):
        publisher.on_pool_event("state", {"worker": f"w{n}", "state": "ready"})
    publisher.on_rejection({"error": "no worker has room", "pool": "any"})
    queued = publisher.queued()
    assert [m["seq"] for m in queued] == [4, 5, 6] and queued[-1]["event"] == "rejected"
    assert registry.get_sample_value("pipeline_balancer_mqtt_dropped_total") == 3
    assert registry.get_sample_value("pipeline_balancer_mqtt_connected") == 0


def test_snapshot_summary_ignores_moving_figures() -> None:
    a = {"workers": [{"name": "w", "state": "ready", "active": 1, "reserved": 0, "fps": {"min": 30.1}}]}
    b = {"workers": [{"name": "w", "state": "ready", "active": 1, "reserved": 0, "fps": {"min": 29.7}}]}
    assert snapshot_summary(a) == snapshot_summary(b)
    assert snapshot_summary(a) != snapshot_summary({"workers": [{**a["workers"][0], "state": "full"}]})


# ---- end to end --------------------------------------------------------------------------------------
class Subscriber:
    """A paho client in the test process that records every message on its topics."""

    def __init__(self, host: str, port: int, *topics: str) -> None:
        self.topics = topics
        self.messages: list[tuple[str, Any, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=5)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def payloads(self, topic: str) -> list[Any]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, topic: str, check: Callable[[Any], bool], timeout: float = 10) -> Any:
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [p for p in self.payloads(topic) if check(p)]
            return bool(found)

        wait_until(seen, timeout, lambda: f"no matching message on {topic}: {self.payloads(topic)}")
        return found[0]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Broker:
    """A Mosquitto process on a fixed port that a test may stop and start again."""

    def __init__(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("mosquitto is not installed: run scripts/test.sh, which installs it")
        self.port = free_port()
        self.conf = Path(tempfile.mkdtemp()) / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.binary = binary
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = Proc([self.binary, "-c", str(self.conf)], name="mosquitto")
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things with a ``stop()`` to call when the test ends, last started first."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()


def metric(lb: Balancer, name: str) -> float:
    text = request("GET", lb.url + "/metrics")[2].decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def mqtt_env(host: str, port: int, prefix: str, **extra: str) -> dict[str, str]:
    return {"MQTT_HOST": f"{host}:{port}", "MQTT_EVENTS_TOPIC": f"{prefix}/events",
            "MQTT_BACKENDS_TOPIC": f"{prefix}/backends", "MQTT_SNAPSHOT_INTERVAL": "0.2",
            "MQTT_RECONNECT_MAX": "1", "MAX_RUNNING_PIPELINES": "1", **extra}


def test_events_and_retained_snapshot(mosquitto: tuple[str, int], start_worker: WorkerFactory,
                                      cleanup: list[Any]) -> None:
    host, port = mosquitto
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    events = f"{prefix}/events"
    sub = Subscriber(host, port, events)
    cleanup.append(sub)
    worker = start_worker("--noise", "0")
    url = worker.url  # type: ignore[attr-defined]
    lb = start_balancer([url], env=mqtt_env(host, port, prefix))
    cleanup.append(lb)

    joined = sub.wait_for(events, lambda e: e["event"] == "joined")
    assert joined["worker"] == url and joined["balancer"].startswith("pipeline-balancer-")
    sub.wait_for(events, lambda e: e["event"] == "ready")
    assert start_pipeline(lb.url)[0] == 200
    full = sub.wait_for(events, lambda e: e["event"] == "full")
    assert (full["worker"], full["state"]) == (url, "full") and "MAX_RUNNING_PIPELINES 1" in full["reason"]
    assert start_pipeline(lb.url)[0] == 503
    rejected = sub.wait_for(events, lambda e: e["event"] == "rejected")
    assert (rejected["pool"], rejected["full"], rejected["error"]) == ("CPU", 1, "no CPU worker has room")

    # a dashboard that subscribes late gets the retained snapshot of /backends at once, and a new
    # one within MQTT_SNAPSHOT_INTERVAL of each change
    late = Subscriber(host, port, f"{prefix}/backends")
    cleanup.append(late)
    first = late.wait_for(f"{prefix}/backends", lambda s: True)
    assert first["limits"]["max_running_pipelines"] == 1 and [w["name"] for w in first["workers"]] == [url]
    assert late.messages[0][2] is True  # it came as the retained message
    late.wait_for(f"{prefix}/backends", lambda s: [(w["state"], w["active"]) for w in s["workers"]] == [("full", 1)])

    worker.signal(signal.SIGKILL)
    unhealthy = sub.wait_for(events, lambda e: e["event"] == "unhealthy")
    assert unhealthy["worker"] == url and unhealthy["reason"]
    seqs = [e["seq"] for e in sub.payloads(events)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert metric(lb, "pipeline_balancer_mqtt_connected") == 1
    assert metric(lb, "pipeline_balancer_mqtt_dropped_total") == 0


def test_broker_outage_never_blocks_starts(start_worker: WorkerFactory, cleanup: list[Any]) -> None:
    broker = Broker()
    cleanup.append(broker)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    events = f"{prefix}/events"
    sub = Subscriber("127.0.0.1", broker.port, events)
    cleanup.append(sub)
    url = start_worker("--noise", "0").url  # type: ignore[attr-defined]
    lb = start_balancer([url], env=mqtt_env("127.0.0.1", broker.port, prefix, MQTT_QUEUE_SIZE="5"))
    cleanup.append(lb)
    before = sub.wait_for(events, lambda e: e["event"] == "ready")["seq"]
    assert lb.backends()["mqtt"]["events"] == before

    broker.stop()
    wait_until(lambda: metric(lb, "pipeline_balancer_mqtt_connected") == 0, 10)
    # routing goes on as if there were no broker: 1 admitted, 6 refused, a stop, 1 admitted (9+ events)
    status, _, body = start_pipeline(lb.url)
    assert status == 200
    assert [start_pipeline(lb.url)[0] for _ in range(6)] == [503] * 6
    assert request("DELETE", f"{lb.url}/pipelines/{json.loads(body)}")[0] == 200
    wait_until(lambda: lb.worker_states()[url] == "ready", 5)
    status, _, body = start_pipeline(lb.url)
    assert status == 200
    made = lb.backends()["mqtt"]["events"]
    assert made - before >= 9
    assert metric(lb, "pipeline_balancer_mqtt_dropped_total") == made - before - 5  # queue of 5, oldest dropped
    assert lb.backends()["mqtt"]["queued"] == 5

    broker.start()  # a new broker process: no retained messages, no sessions
    wait_until(lambda: metric(lb, "pipeline_balancer_mqtt_connected") == 1, 10)
    wait_until(lambda: lb.backends()["mqtt"]["queued"] == 0, 5)
    assert request("DELETE", f"{lb.url}/pipelines/{json.loads(body)}")[0] == 200
    sub.wait_for(events, lambda e: e["event"] == "ready" and e["seq"] > made, timeout=10)
    # of the outage's events, only the newest 5 can have come through: the gap in seq shows the drop
    assert len([e for e in sub.payloads(events) if before < e["seq"] <= made]) <= 5
    snapshot = Subscriber("127.0.0.1", broker.port, f"{prefix}/backends")
    cleanup.append(snapshot)
    assert snapshot.wait_for(f"{prefix}/backends", lambda s: True)["workers"][0]["name"] == url
    assert get_json(lb.url + "/backends")["mqtt"]["connected"] is True


def test_a_standby_publishes_nothing() -> None:
    """Under HA only the leader speaks: a standby's state changes and rejections are not queued."""
    leader = [False]
    publisher = EventPublisher(MqttSettings(host="127.0.0.1:1"), CollectorRegistry(), lambda: {"workers": []},
                               active=lambda: leader[0])
    publisher.on_pool_event("joined", {"worker": "w1"})
    publisher.on_rejection({"error": "no worker has room"})
    assert publisher.queued() == []
    leader[0] = True
    publisher.on_pool_event("state", {"worker": "w1", "state": "ready"})
    assert [m["event"] for m in publisher.queued()] == ["ready"]
