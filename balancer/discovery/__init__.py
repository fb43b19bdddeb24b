"""Where workers come from: a static list or the Kubernetes pod watch (DESIGN §4)."""

from __future__ import annotations

from balancer.config import ConfigError, DiscoverySettings
from balancer.discovery.base import Discovery, DiscoverySink, WorkerSpec
from balancer.discovery.static import StaticDiscovery

__all__ = ["Discovery", "DiscoverySink", "WorkerSpec", "make_discovery"]


def make_discovery(settings: DiscoverySettings) -> Discovery:
    """The discovery source the settings ask for. Raises :class:`ConfigError` on a bad label selector."""
    if settings.source == "kubernetes":
        # imported here so static set-ups never load kubernetes_asyncio
        from balancer.discovery.kubernetes import KubernetesDiscovery

        try:
            return KubernetesDiscovery(settings)
        except ValueError as exc:
            raise ConfigError(f"discovery.selector: {exc}") from None
    return StaticDiscovery(settings.workers)
