"""The fast upstream client (see :mod:`balancer.upstream.client` for the error rules and the start policy)."""

from balancer.upstream.client import FastUpstream

__all__ = ["FastUpstream"]
