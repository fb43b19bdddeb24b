"""The contract between discovery sources and the worker pool.

A discovery source (a static list, the Kubernetes pod watch) knows *which*
workers exist and whether they may take new starts. It never talks HTTP to the
workers: it describes each one as a :class:`WorkerSpec` and hands the specs to
a :class:`DiscoverySink` (the pool). Health, load and admission are the pool's
and the health poller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class WorkerSpec:
    """What discovery knows about one worker."""

    key: str
    """Stable identity. Kubernetes: ``"<pod name>/<pod uid>"`` (never the IP: IPs are reused).
    Static list: the URL."""

    name: str
    """Human name shown in ``/backends`` and logs: the pod name, or the URL."""

    url: str
    """Base URL of the worker's REST API, e.g. ``http://10.1.2.3:8080``."""

    routable: bool = True
    """May take new pipeline starts: it has an address, is Ready and is not terminating."""

    terminating: bool = False
    """Being deleted: still serves requests for its own instances, takes no new starts."""

    device: str | None = None
    """``"CPU"``, ``"GPU"`` or None when unknown (then it is in every device pool)."""

    node: str | None = None
    """The Kubernetes node it runs on, when known."""

    reason: str = ""
    """Why it is not routable (e.g. ``"not ready"``, ``"no pod IP"``), empty when it is."""

    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    """Pod labels, for display."""


class DiscoverySink(Protocol):
    """What a discovery source feeds. The pool implements it; every call is synchronous and cheap."""

    def replace_workers(self, specs: list[WorkerSpec]) -> None:
        """The full set of workers: anything not in ``specs`` is gone (initial list, re-list after 410)."""

    def upsert_worker(self, spec: WorkerSpec) -> None:
        """A worker appeared or changed."""

    def remove_worker(self, key: str) -> None:
        """A worker is gone for good (pod deleted, left the selector)."""


class Discovery(Protocol):
    """A long-running source of workers. ``run`` is owned and cancelled by the server."""

    @property
    def synced(self) -> bool:
        """True once the first full set of workers has been delivered (``/readyz``)."""

    async def run(self, sink: DiscoverySink) -> None:
        """Feed the sink until cancelled. Must never raise except ``CancelledError``."""

    def to_dict(self) -> dict[str, Any]:
        """State for ``/backends`` (e.g. watch connected, resourceVersion, restarts)."""
