"""The MQTT metadata destination: one paho-mqtt client per instance, like ``gvametapublish``.

The blocking connect runs in a thread and the client's network loop in paho's
own thread (``loop_start``), so publishing from the event loop only queues
packets. An unreachable broker, or one that refuses the connection, raises the
sink error, which puts the instance into ERROR with that message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from balancer.sim.sinks import SinkError

log = logging.getLogger("balancer.sim.mqtt")
DEFAULT_PORT = 1883


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (port 1883 when absent; ``[v6]:port`` works) → ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        host, port = address, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536 or not host.strip("[]"):
        raise ValueError(f"invalid MQTT address {address!r}")
    return host.strip("[]"), int(port)


class MqttSink:
    """Publishes each frame's metadata as one QoS 0 message on ``topic``."""

    def __init__(self, address: str, topic: str, client_id: str, timeout: float = 5.0) -> None:
        self.address = address
        self.topic = topic
        self.timeout = timeout
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.connect_timeout = timeout
        self._started = False

    def _error(self, reason: object) -> SinkError:
        return SinkError(f"Error on Pipeline: gvametapublish: failed to connect to MQTT broker "
                         f"{self.address}: {reason}")

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[ReasonCode] = loop.create_future()

        def deliver(code: ReasonCode) -> None:
            if not connected.done():
                connected.set_result(code)

        def on_connect(_c: paho.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
            loop.call_soon_threadsafe(deliver, code)

        self.client.on_connect = on_connect
        try:
            host, port = split_address(self.address)
            await asyncio.wait_for(
                loop.run_in_executor(None, self.client.connect, host, port, 30), self.timeout + 1)
            self.client.loop_start()
            self._started = True
            code = await asyncio.wait_for(connected, self.timeout)
        except (OSError, ValueError, TimeoutError) as exc:
            await self.close()
            raise self._error(str(exc) or "timed out") from exc
        if code.is_failure:
            await self.close()
            raise self._error(code)
        log.info("connected to MQTT broker %s, topic %s", self.address, self.topic)

    def publish(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.client.publish(self.topic, payload, qos=0)

    async def close(self) -> None:
        """Disconnect after the queued messages are written (paho's loop thread sends them first)."""
        if not self._started:
            return
        self._started = False
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
