"""Prometheus metrics, named ``pipeline_balancer_*`` (prometheus_client conventions).

Counters and histograms are updated where things happen; gauges that describe
the pool (workers by state, per-worker load, watch state) are read from the pool
and discovery at scrape time, so they can never drift from ``/backends``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from balancer.admission import STATES

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PoolCollector(Collector):
    """Gauges computed from live state at scrape time."""

    def __init__(self, pool_state: Callable[[], dict[str, Any]], discovery_state: Callable[[], dict[str, Any]]):
        self._pool_state = pool_state
        self._discovery_state = discovery_state

    def collect(self) -> Iterator[Metric]:
        workers = self._pool_state()["workers"]
        by_state = GaugeMetricFamily("pipeline_balancer_workers", "Workers by admission state", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], sum(1 for w in workers if w["state"] == state))
        yield by_state
        active = GaugeMetricFamily(
            "pipeline_balancer_worker_active_pipelines", "RUNNING + QUEUED pipelines per worker", labels=["worker"]
        )
        reserved = GaugeMetricFamily(
            "pipeline_balancer_worker_reserved_starts", "Starts counted but not yet listed", labels=["worker"]
        )
        min_fps = GaugeMetricFamily(
            "pipeline_balancer_worker_min_fps", "Lowest current fps of a running pipeline", labels=["worker"]
        )
        for w in workers:
            active.add_metric([w["name"]], w["active"])
            reserved.add_metric([w["name"]], w["reserved"])
            if w["fps"]["min"] is not None:
                min_fps.add_metric([w["name"]], w["fps"]["min"])
        yield active
        yield reserved
        yield min_fps

        watch = self._discovery_state()
        if watch.get("source") == "kubernetes":
            yield CounterMetricFamily(
                "pipeline_balancer_watch_restarts", "Pod watch streams restarted", value=watch.get("restarts", 0)
            )
            yield CounterMetricFamily(
                "pipeline_balancer_watch_relists", "Pod re-lists (410 Gone or errors)", value=watch.get("relists", 0)
            )
            yield GaugeMetricFamily(
                "pipeline_balancer_watch_connected",
                "1 while the pod watch is connected",
                value=1 if watch.get("connected") else 0,
            )
        yield GaugeMetricFamily(
            "pipeline_balancer_discovery_synced", "1 once discovery has listed workers",
            value=1 if watch.get("synced") else 0,
        )


class LeaderCollector(Collector):
    """Leader election (HA) gauges, read from the elector's state at scrape time."""

    def __init__(self, ha_state: Callable[[], dict[str, Any]]):
        self._ha_state = ha_state

    def collect(self) -> Iterator[Metric]:
        ha = self._ha_state()
        yield GaugeMetricFamily("pipeline_balancer_leader", "1 while this replica holds the lease (HA)",
                                value=1 if ha.get("is_leader") else 0)
        yield CounterMetricFamily("pipeline_balancer_leader_transitions",
                                  "Times this replica became the leader", value=ha.get("terms", 0))


class LabelCache:
    """``metric.labels(...)`` memoised: prometheus_client takes a lock and builds a key on every call,
    which is most of a counter's cost on the per-request path. The label space is small and fixed."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[object, ...], Any] = {}

    def __call__(self, *values: object) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*(str(v) for v in values))
        return child


class Metrics:
    """One registry per server, so tests and embedded servers never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipeline_balancer_requests", "Client requests by route, method and status code",
            ["route", "method", "code"], registry=r,
        )
        self.upstream_latency = Histogram(
            "pipeline_balancer_upstream_latency_seconds", "Time a worker took to answer a forwarded request",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "pipeline_balancer_upstream_errors", "Forwarded requests that got no answer, by kind",
            ["kind"], registry=r,
        )
        self.rejections = Counter(
            "pipeline_balancer_rejections", "Starts answered 503, by reason and device pool",
            ["reason", "pool"], registry=r,
        )
        self.admissions = Counter(
            "pipeline_balancer_admission_decisions", "Admission decisions for starts",
            ["decision"], registry=r,
        )
        self.start_retries = Counter(
            "pipeline_balancer_start_retries", "Starts moved to another worker after a delivery failure",
            registry=r,
        )
        self.polls = Counter("pipeline_balancer_polls", "Status polls of workers", registry=r)
        self.poll_failures = Counter(
            "pipeline_balancer_poll_failures", "Status polls that failed, by kind", ["kind"], registry=r
        )
        self.owner_lookups = Counter(
            "pipeline_balancer_owner_lookups", "Instance owners found by asking every worker, by outcome",
            ["outcome"], registry=r,
        )

    def watch(self, pool_state: Callable[[], dict[str, Any]], discovery_state: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(PoolCollector(pool_state, discovery_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
