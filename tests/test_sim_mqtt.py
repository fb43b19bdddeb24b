"""Metadata destinations of a real worker: MQTT through a real Mosquitto broker, files, broker errors."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import WorkerFactory
from tests.contract import call, check_status_entry, expect_instance_id, expect_json, wait_until
from tests.procs import Proc, free_port

PIPELINE = "/pipelines/object_detection/person_vehicle_bike"
URI = "https://github.com/intel-iot-devkit/sample-videos/raw/master/person-bicycle-car-detection.mp4"


class Subscriber:
    """A paho client collecting every message on one topic."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=0)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message.payload)

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(m) for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribe(mosquitto: tuple[str, int]) -> Iterator[Any]:
    subscribers: list[Subscriber] = []

    def make(topic: str) -> Subscriber:
        subscribers.append(Subscriber(*mosquitto, topic))
        return subscribers[-1]

    yield make
    for subscriber in subscribers:
        subscriber.close()


def url_of(worker: Proc) -> str:
    return str(worker.url)  # type: ignore[attr-defined]


def status(url: str, instance_id: str) -> dict[str, Any]:
    return check_status_entry(expect_json(call("GET", f"{url}/pipelines/status/{instance_id}")))


def check_message(message: dict[str, Any], source: str) -> None:
    """The seed's example output: objects with detection/bounding_box, resolution, source, timestamp (ns)."""
    assert set(message) >= {"objects", "resolution", "source", "timestamp"}
    assert message["resolution"] == {"height": 720, "width": 1280}
    assert message["source"] == source
    assert isinstance(message["timestamp"], int) and message["timestamp"] >= 0
    assert message["objects"]
    for obj in message["objects"]:
        detection = obj["detection"]
        box = detection["bounding_box"]
        assert set(box) == {"x_min", "y_min", "x_max", "y_max"}
        assert 0 <= box["x_min"] < box["x_max"] <= 1 and 0 <= box["y_min"] < box["y_max"] <= 1
        assert 0 < detection["confidence"] <= 1
        assert isinstance(detection["label"], str) and isinstance(detection["label_id"], int)
        for key in ("x", "y", "w", "h"):
            assert isinstance(obj[key], int) and obj[key] >= 0
        assert obj["x"] + obj["w"] <= 1281 and obj["y"] + obj["h"] <= 721


def test_one_mqtt_message_per_frame(start_worker: WorkerFactory, mosquitto: tuple[str, int], subscribe: Any) -> None:
    host, port = mosquitto
    subscriber = subscribe("dlstreamer")
    url = url_of(start_worker("--capacity-fps", "300"))
    body = {
        "source": {"uri": URI, "type": "uri", "properties": {"sim-frames": 60}},
        "destination": {"metadata": {"type": "mqtt", "host": f"{host}:{port}", "topic": "dlstreamer"}},
        "parameters": {"detection-device": "CPU"},
        "tags": {"camera": "north"},
    }
    instance_id = expect_instance_id(call("POST", url + PIPELINE, body))
    wait_until(lambda: status(url, instance_id)["state"] == "COMPLETED", what="COMPLETED")
    messages = wait_until(lambda: len(m := subscriber.received()) >= 60 and m, what="60 messages")
    time.sleep(0.2)
    assert len(subscriber.received()) == 60
    for message in messages:
        check_message(message, URI)
        assert message["tags"] == {"camera": "north"}
    stamps = [m["timestamp"] for m in messages]
    assert stamps == sorted(stamps) and len(set(stamps)) == 60
    assert stamps[1] - stamps[0] == pytest.approx(1e9 / 30, abs=1)


def test_legacy_flat_mqtt_destination(start_worker: WorkerFactory, mosquitto: tuple[str, int],
                                      subscribe: Any) -> None:
    host, port = mosquitto
    subscriber = subscribe("flat")
    url = url_of(start_worker("--capacity-fps", "100"))
    body = {"source": {"uri": "rtsp://camera/1", "type": "uri"},
            "destination": {"type": "mqtt", "host": f"{host}:{port}", "topic": "flat"}}
    instance_id = expect_instance_id(call("POST", url + PIPELINE, body))
    wait_until(lambda: len(subscriber.received()) >= 5, what="5 messages")
    summary = expect_json(call("GET", f"{url}/pipelines/{instance_id}"))
    assert summary["request"]["destination"] == {"metadata": body["destination"]}
    call("DELETE", f"{url}/pipelines/{instance_id}")
    check_message(subscriber.received()[0], "rtsp://camera/1")


def test_unreachable_broker_puts_the_instance_in_error(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker())
    address = f"127.0.0.1:{free_port()}"
    body = {"source": {"uri": URI, "type": "uri"},
            "destination": {"metadata": {"type": "mqtt", "host": address, "topic": "t"}}}
    instance_id = expect_instance_id(call("POST", url + PIPELINE, body))  # still 200 + id
    entry = wait_until(lambda: (e := status(url, instance_id))["state"] == "ERROR" and e, what="ERROR")
    assert address in entry["message"] and "MQTT" in entry["message"]
    time.sleep(0.2)
    assert status(url, instance_id)["state"] == "ERROR"


def test_error_frees_the_slot_for_a_queued_instance(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker("--max-running-pipelines", "1"))
    bad = {"source": {"uri": URI, "type": "uri"},
           "destination": {"metadata": {"type": "mqtt", "host": f"127.0.0.1:{free_port()}", "topic": "t"}}}
    failing = expect_instance_id(call("POST", url + PIPELINE, bad))
    waiting = expect_instance_id(call("POST", url + PIPELINE, {"source": {"uri": URI, "type": "uri"}}))
    wait_until(lambda: status(url, waiting)["state"] == "RUNNING", what="queued instance running")
    assert status(url, failing)["state"] == "ERROR"


def test_file_destination_writes_json_lines(start_worker: WorkerFactory, tmp_path: Path) -> None:
    url = url_of(start_worker("--capacity-fps", "500"))
    out = tmp_path / "results.jsonl"
    body = {"source": {"uri": "file:///v.mp4", "type": "uri", "properties": {"sim-frames": 25}},
            "destination": {"metadata": {"type": "file", "path": str(out), "format": "json-lines"}}}
    instance_id = expect_instance_id(call("POST", url + PIPELINE, body))
    wait_until(lambda: status(url, instance_id)["state"] == "COMPLETED", what="COMPLETED")
    lines = wait_until(lambda: len(t := out.read_text().splitlines()) == 25 and t, what="25 lines")
    for line in lines:
        check_message(json.loads(line), "file:///v.mp4")


def test_unwritable_file_destination_is_an_error(start_worker: WorkerFactory, tmp_path: Path) -> None:
    url = url_of(start_worker())
    body = {"source": {"uri": "file:///v.mp4", "type": "uri"},
            "destination": {"metadata": {"type": "file", "path": str(tmp_path / "missing" / "x.jsonl")}}}
    instance_id = expect_instance_id(call("POST", url + PIPELINE, body))
    entry = wait_until(lambda: (e := status(url, instance_id))["state"] == "ERROR" and e, what="ERROR")
    assert "missing" in entry["message"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_while_publishing(start_worker: WorkerFactory, mosquitto: tuple[str, int],
                                         subscribe: Any, sig: signal.Signals) -> None:
    host, port = mosquitto
    subscriber = subscribe("busy")
    worker = start_worker("--capacity-fps", "300")
    url = url_of(worker)
    body = {"source": {"uri": URI, "type": "uri"},
            "destination": {"metadata": {"type": "mqtt", "host": f"{host}:{port}", "topic": "busy"}}}
    for _ in range(3):
        expect_instance_id(call("POST", url + PIPELINE, body))
    wait_until(lambda: len(subscriber.received()) >= 30, what="messages flowing")
    began = time.monotonic()
    worker.signal(sig)
    assert worker.wait(timeout=5) == 0
    assert time.monotonic() - began < 3
    assert "Traceback" not in worker.output()
