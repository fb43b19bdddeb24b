"""The balancer's lifecycle: start the parts, serve, drain on SIGTERM, stop every task it owns."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from balancer.admin import Admin
from balancer.admission import Limits
from balancer.app import build_admin_app, build_app
from balancer.config import Config, parse_fallback, split_host_port
from balancer.discovery import make_discovery
from balancer.discovery.base import Discovery
from balancer.dispatch import Dispatcher, json_response
from balancer.events import EventPublisher
from balancer.front.connection import Limits as FrontLimits
from balancer.front.server import FastFront
from balancer.health import HealthPoller
from balancer.leader import LeaderElector
from balancer.logs import event, setup_logging
from balancer.metrics import LeaderCollector, Metrics
from balancer.pool import WorkerPool
from balancer.proxy import AiohttpUpstream, Response, Upstream
from balancer.upstream import FastUpstream

log = logging.getLogger("balancer.server")


def limits_from(config: Config) -> Limits:
    a = config.admission
    return Limits(a.max_running_pipelines, a.target_fps, a.warmup, config.health.stale_after, a.predictive)


def make_upstream(config: Config) -> Upstream:
    """The client to workers: the fast pooled one, or aiohttp's (``upstream.client``)."""
    u = config.upstream
    if u.client == "aiohttp":
        return AiohttpUpstream(u.connect_timeout)
    return FastUpstream(u.connect_timeout, u.max_connections_per_worker, u.idle_timeout, u.start_reuse_idle)


class Server:
    """Owns the pool, the poller, discovery, the upstream client and the listening sockets."""

    def __init__(
        self,
        config: Config,
        discovery: Discovery | None = None,
        upstream: Upstream | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.discovery = discovery or make_discovery(config.discovery)
        self._upstream = upstream
        self.metrics = Metrics()
        self.pool = WorkerPool(limits_from(config), config.admission.pending_timeout, clock,
                               config.admission.strategy, parse_fallback(config.admission.fallback))
        self.pool.listeners.append(self._on_pool_event)
        self.events: EventPublisher | None = None
        if config.mqtt.host:
            self.events = EventPublisher(config.mqtt, self.metrics.registry, self.backends, clock,
                                         active=lambda: self.standby_reason() is None)
            self.pool.listeners.append(self.events.on_pool_event)
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
        self._fronts: list[FastFront] = []
        self._dispatcher: Dispatcher | None = None
        self.poller: HealthPoller | None = None
        self.elector: LeaderElector | None = None
        self._takeover_round = 0
        if config.ha.enabled:
            from balancer.discovery.kubernetes import resolve_namespace

            self.elector = LeaderElector(config.ha, resolve_namespace(config.discovery.namespace),
                                         config.discovery.kubeconfig)
            self.elector.on_leading.append(self._took_over)
            self.metrics.registry.register(LeaderCollector(self.ha_state))

    # ---- state for the admin routes ------------------------------------------------------
    def backends(self) -> dict[str, Any]:
        a = self.config.admission
        return {
            **self.pool.to_dict(),
            "discovery": self.discovery.to_dict(),
            "ha": self.ha_state(),
            "limits": {"max_running_pipelines": a.max_running_pipelines, "target_fps": a.target_fps,
                       "warmup": a.warmup, "predictive": a.predictive, "strategy": a.strategy,
                       "device_fallback": a.fallback},
            **({"mqtt": self.events.to_dict()} if self.events is not None else {}),
        }

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.discovery.synced:
            return False, "discovery has not synced yet"
        standby = self.standby_reason()
        if standby is not None:
            return False, standby
        return True, ""

    # ---- active-passive HA (docs/ha.md) ---------------------------------------------------------
    def standby_reason(self) -> str | None:
        """Why this replica must not serve pipeline routes now, or None: it is not HA, or it leads.

        A new leader also waits for one round of polls begun after it took the lease, so its
        admission counts every pipeline the previous leader started (owners come with them).
        """
        if self.elector is None:
            return None
        if not self.elector.is_leader():
            holder = self.elector.holder
            if holder and holder != self.elector.identity:
                return f"standby: lease held by {holder}"
            if holder:
                return "standby: lease not renewed in time (is the API server reachable?)"
            return "standby: no leader yet"
        if self.poller is None or self.poller.rounds_done <= self._takeover_round:
            return "taking over: polling every worker first"
        return None

    def _standby_answer(self) -> Response | None:
        """The 503 a standby gives pipeline routes: two replicas admitting at once would break exact admission."""
        reason = self.standby_reason()
        if reason is None or self.elector is None:
            return None
        return json_response(
            503, {"error": "standby replica", "leader": self.elector.holder or None,
                  "replica": self.elector.identity, "reason": reason},
            [("Retry-After", str(self.config.admission.retry_after))],
        )

    def _took_over(self) -> None:
        self._takeover_round = self.poller.rounds_started if self.poller is not None else 0
        if self.poller is not None:
            self.poller.wake()
        event(log, "leader: this replica took the lease", identity=self.elector.identity if self.elector else "")

    def ha_state(self) -> dict[str, Any]:
        if self.elector is None:
            return {"enabled": False}
        reason = self.standby_reason()
        return {**self.elector.to_dict(), "serving": reason is None, "reason": reason or ""}

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        upstream = self._upstream or make_upstream(cfg)
        self._upstream = upstream
        self.metrics.watch(self.pool.to_dict, self.discovery.to_dict)
        self.poller = HealthPoller(
            self.pool, upstream, self.metrics, cfg.health.poll_interval, cfg.health.poll_timeout, self.clock
        )
        dispatcher = self._dispatcher = Dispatcher(cfg, self.pool, upstream, self.metrics, self.clock)
        token = self._read_token()
        self._spawn("discovery", lambda: self.discovery.run(self.pool))
        self._spawn("health", self.poller.run)
        if self.elector is not None:
            dispatcher.gate = self._standby_answer
            self._spawn("leader election", self.elector.run)  # cancelled in stop(): releases the lease
        if self.events is not None:
            dispatcher.rejection_listeners.append(self.events.on_rejection)
            self._spawn("mqtt", self.events.run)

        separate_admin = bool(cfg.server.admin_listen)
        api_admin = Admin(self, token, probes_only=separate_admin)
        if cfg.server.front == "fast":
            await self._listen_fast(api_admin, dispatcher, cfg.server.listen)
            if separate_admin:
                await self._listen_fast(Admin(self, token), None, cfg.server.admin_listen)
        else:
            await self._listen(build_app(api_admin, dispatcher, cfg.server.max_body_bytes), cfg.server.listen)
            if separate_admin:
                await self._listen(build_admin_app(Admin(self, token)), cfg.server.admin_listen)
        event(log, "listening", api=cfg.server.listen, admin=cfg.server.admin_listen or cfg.server.listen,
              discovery=cfg.discovery.source, max_running_pipelines=cfg.admission.max_running_pipelines,
              target_fps=cfg.admission.target_fps)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then stop everything."""
        self.stopping = True
        event(log, "shutting down", grace=self.config.server.shutdown_grace)
        await asyncio.gather(*(front.drain(self.config.server.shutdown_grace) for front in self._fronts),
                             *(runner.cleanup() for runner in self._runners))
        if self._dispatcher is not None:
            await self._dispatcher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._upstream is not None:
            await self._upstream.close()
        event(log, "stopped")

    async def _listen(self, app: web.Application, address: str) -> None:
        host, port = split_host_port(address)
        # aiohttp waits shutdown_timeout for a handler, then as long again after cancelling it: half the grace
        # each, so a stuck request cannot hold the exit past the grace period
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.server.shutdown_grace / 2)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()

    async def _listen_fast(self, admin: Admin, dispatcher: Dispatcher | None, address: str) -> None:
        s = self.config.server
        limits = FrontLimits(s.max_body_bytes, s.max_header_bytes, s.header_timeout, s.keepalive_timeout)
        front = FastFront(admin, dispatcher, limits, s.max_connections)
        self._fronts.append(front)
        await front.start(*split_host_port(address))

    def _read_token(self) -> str | None:
        path = self.config.server.admin_token_file
        if not path:
            return None
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"admin token file {path} is empty")
        return token

    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a background loop for the server's lifetime; a crash is logged and the loop restarted."""

        async def supervise() -> None:
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s loop crashed; restarting in 1s", name)
                    await asyncio.sleep(1.0)

        self._tasks.append(asyncio.create_task(supervise(), name=name))

    def _on_pool_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "joined" and self.poller is not None:
            self.poller.wake()
        level = logging.WARNING if fields.get("state") == "unhealthy" else logging.INFO
        event(log, f"worker {kind}", level, **fields)


async def serve(config: Config) -> int:
    server = Server(config)
    try:
        await server.start()
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        await server.stop()
        return 1
    # what start-up built lives as long as the process: keep it out of the collector's full passes
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def run_server(config: Config) -> int:
    setup_logging(config.log.level, config.log.format)
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(serve(config))
    return 130
