"""Worker state changes and refused starts, published to MQTT for dashboards (DESIGN §5).

Two topics: ``events`` gets one JSON message per worker state change (joined,
ready, full, unhealthy, left ...) and per refused start; ``backends`` holds a
retained snapshot of ``/backends``, republished when something changed, at most
once per ``snapshot_interval``, so a dashboard that subscribes late sees the
cluster at once.

Routing never waits for the broker. The pool's listeners and the rejection hook
only append to a bounded queue (the oldest message is dropped when it is full,
and counted in ``pipeline_balancer_mqtt_dropped_total``). An owned task hands
the queue to paho only while connected; paho's own thread does the network I/O
and reconnects with exponential backoff. Messages go with QoS 1 and paho keeps
at most ``PAHO_QUEUE`` of them unacknowledged: a broker that stops reading
without closing the connection cannot grow memory either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry, Counter, Gauge

from balancer.config import MqttSettings, split_host_port

log = logging.getLogger("balancer.events")

PAHO_INFLIGHT = 20
PAHO_QUEUE = 100
"""Messages paho may hold unacknowledged (in flight + queued); beyond, ours wait in our queue."""
RECONNECT_MIN = 0.5
"""Seconds before the first reconnection attempt; doubles up to ``MqttSettings.reconnect_max``."""
SNAPSHOT_REFRESH = 30.0
"""Seconds after which the snapshot is republished even if no state changed (fps figures move)."""
STOP_TIMEOUT = 3.0
"""Seconds shutdown waits for paho's thread to flush and stop."""

Message = tuple[str, bytes, bool]
"""(topic, payload, retain)"""


def event_message(kind: str, fields: dict[str, Any], seq: int, wall: float, source: str) -> dict[str, Any]:
    """The JSON of one event. A pool ``state`` event is named after the new state (``full``...).

    ``seq`` counts the events of this balancer process: a gap tells a subscriber that
    messages were dropped while the broker was away.
    """
    name = fields.get("state", kind) if kind == "state" else kind
    return {"event": name, **fields, "seq": seq, "time": round(wall, 3), "balancer": source}


def snapshot_summary(backends: dict[str, Any]) -> tuple[Any, ...]:
    """What must change for a new snapshot to go out before the periodic refresh."""
    return tuple(
        (w.get("name"), w.get("state"), w.get("active"), w.get("reserved")) for w in backends.get("workers", [])
    )


def default_client_id() -> str:
    return f"pipeline-balancer-{socket.gethostname()}-{os.getpid()}"


class EventPublisher:
    """Queue events from the event loop; publish them from an owned task through paho's thread."""

    def __init__(
        self,
        settings: MqttSettings,
        registry: CollectorRegistry,
        snapshot: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.active = active
        """False on an HA standby: the leader alone speaks for the cluster (events and the retained snapshot)."""
        self.client_id = settings.client_id or default_client_id()
        self.snapshot = snapshot
        self.clock = clock
        self.wall = wall
        self._queue: deque[Message] = deque()
        self.sequence = 0
        """Events made so far: each event's ``seq``."""
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        self._unreachable = threading.Event()
        self._dirty = True
        self._summary: tuple[Any, ...] | None = None
        self._snapshot_at: float | None = None
        self._snapshot: bytes | None = None
        """The latest snapshot not yet handed to paho (only the newest one matters: it is retained)."""
        self.dropped = Counter(
            "pipeline_balancer_mqtt_dropped", "MQTT messages dropped because the broker was away and the queue full",
            registry=registry,
        )
        self.published = Counter(
            "pipeline_balancer_mqtt_published", "MQTT messages handed to the broker connection", registry=registry,
        )
        connected = Gauge("pipeline_balancer_mqtt_connected", "1 while connected to the MQTT broker", registry=registry)
        connected.set_function(lambda: 1.0 if self._connected.is_set() else 0.0)

    # ---- producers: called on the event loop, O(1), never block -----------------------------
    def on_pool_event(self, kind: str, fields: dict[str, Any]) -> None:
        """A ``WorkerPool`` listener: joined, left, or a new admission state."""
        self._dirty = True
        if not self.active():
            return
        self._enqueue(event_message(kind, fields, self._next(), self.wall(), self.client_id))

    def on_rejection(self, body: dict[str, Any]) -> None:
        """A ``Dispatcher`` rejection listener: ``body`` is the 503's JSON."""
        self._dirty = True
        if not self.active():
            return
        self._enqueue(event_message("rejected", body, self._next(), self.wall(), self.client_id))

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def _enqueue(self, message: dict[str, Any]) -> None:
        if len(self._queue) >= self.settings.queue_size:
            self._queue.popleft()
            self.dropped.inc()
        self._queue.append((self.settings.events_topic, json.dumps(message).encode(), False))
        self._wake.set()

    # ---- the owned task ------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect (in paho's thread), then publish until cancelled; on cancel, flush briefly and stop."""
        self._loop = asyncio.get_running_loop()
        client = self._client()
        host, port = split_host_port(self.settings.host)
        client.connect_async(host, port, keepalive=self.settings.keepalive)
        client.loop_start()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.snapshot_interval)
                self._wake.clear()
                self._take_snapshot()
                self._drain(client)
        finally:
            self._drain(client)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self._stop, client), timeout=STOP_TIMEOUT)

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        client.reconnect_delay_set(RECONNECT_MIN, self.settings.reconnect_max)  # type: ignore[arg-type]
        client.max_inflight_messages_set(PAHO_INFLIGHT)
        client.max_queued_messages_set(PAHO_QUEUE)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        return client

    def _take_snapshot(self) -> None:
        """Build the ``/backends`` snapshot when it changed, at most once per ``snapshot_interval``
        (not while disconnected: reconnecting takes a fresh one)."""
        now = self.clock()
        if not self._connected.is_set() or not self.active():
            return
        if self._snapshot_at is not None and now - self._snapshot_at < self.settings.snapshot_interval:
            return
        backends = self.snapshot()
        summary = snapshot_summary(backends)
        refresh = self._snapshot_at is None or now - self._snapshot_at >= SNAPSHOT_REFRESH
        if not (self._dirty or refresh or summary != self._summary):
            return
        self._dirty, self._summary, self._snapshot_at = False, summary, now
        self._snapshot = json.dumps({**backends, "time": round(self.wall(), 3), "balancer": self.client_id}).encode()

    def _drain(self, client: mqtt.Client) -> None:
        """Hand queued messages to paho while connected and paho has room; keep the rest."""
        if not self._connected.is_set():
            return
        while self._queue:
            topic, payload, retain = self._queue[0]
            if not self._publish(client, topic, payload, retain):
                return
            self._queue.popleft()
        if self._snapshot is not None and self._publish(client, self.settings.backends_topic, self._snapshot, True):
            self._snapshot = None

    def _publish(self, client: mqtt.Client, topic: str, payload: bytes, retain: bool) -> bool:
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return False  # paho is full: the broker is slow or gone; wait in our queue
        self.published.inc()  # SUCCESS, or NO_CONN: paho holds it and sends it after reconnecting
        return True

    def _stop(self, client: mqtt.Client) -> None:
        client.disconnect()
        client.loop_stop()

    # ---- paho's thread ------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s refused the connection: %s", self.settings.host, reason)
            return
        log.info("MQTT connected to %s", self.settings.host)
        self._unreachable.clear()
        self._connected.set()
        self._call(self._reconnected)

    def _reconnected(self) -> None:
        """On the event loop: republish the snapshot now (a broker without persistence lost it) and drain."""
        self._dirty, self._snapshot_at = True, None
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._unreachable.is_set():  # once per outage: paho retries with backoff, quietly
            self._unreachable.set()
            log.warning("MQTT broker %s unreachable; retrying with backoff up to %gs",
                        self.settings.host, self.settings.reconnect_max)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set():
            log.warning("MQTT connection to %s lost: %s; reconnecting", self.settings.host, reason)
        self._connected.clear()

    def _call(self, callback: Callable[[], None]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing left to do
                self._loop.call_soon_threadsafe(callback)

    def queued(self) -> list[dict[str, Any]]:
        """The events waiting for the broker, oldest first."""
        return [json.loads(payload) for _, payload, _ in self._queue]

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.settings.host, "connected": self._connected.is_set(), "queued": len(self._queue),
                "events": self.sequence, "events_topic": self.settings.events_topic,
                "backends_topic": self.settings.backends_topic}
