"""The balancer's own routes (``/backends``, ``/metrics``, ``/healthz``, ``/readyz``) as plain functions.

Both front ends (aiohttp and the fast one) call these, so the routes, the JSON
and the bearer-token rule cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from balancer.metrics import Metrics
from balancer.proxy import Response

JSON = "application/json; charset=utf-8"
PROBES = ("/healthz", "/readyz")
GUARDED = ("/backends", "/metrics")
"""Behind the bearer token when one is configured."""


class AdminState(Protocol):
    """What the admin routes read: the server's live state."""

    metrics: Metrics

    def backends(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, str]: ...


def json_answer(payload: object, status: int = 200) -> Response:
    return Response(status, [("Content-Type", JSON)], (json.dumps(payload, indent=1) + "\n").encode())


class Admin:
    """Answers GET/HEAD on the admin paths; ``probes_only`` when ``/backends`` and ``/metrics`` live elsewhere."""

    def __init__(self, state: AdminState, token: str | None, probes_only: bool = False) -> None:
        self.state = state
        self._expected = f"Bearer {token}".encode() if token is not None else None
        routes: dict[str, Callable[[], Response]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/backends": self.backends,
            "/metrics": self.metrics,
        }
        self.routes = {p: h for p, h in routes.items() if not probes_only or p in PROBES}

    def paths(self) -> list[str]:
        return list(self.routes)

    def serves(self, path: str) -> bool:
        return path in self.routes

    def answer(self, path: str, authorization: str | None) -> Response:
        """The answer to ``GET path`` (callers check :meth:`serves` first)."""
        if path in GUARDED and not self.authorized(authorization):
            return Response(
                401,
                [("Content-Type", JSON), ("WWW-Authenticate", 'Bearer realm="pipeline-balancer"')],
                b'{"error": "bearer token required"}\n',
            )
        return self.routes[path]()

    def authorized(self, authorization: str | None) -> bool:
        if self._expected is None:
            return True
        return hmac.compare_digest((authorization or "").encode(), self._expected)

    def backends(self) -> Response:
        return json_answer(self.state.backends())

    def metrics(self) -> Response:
        return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], self.state.metrics.render())

    def healthz(self) -> Response:
        return json_answer({"status": "ok"})

    def readyz(self) -> Response:
        ready, reason = self.state.readiness()
        return json_answer({"ready": ready, "reason": reason}, 200 if ready else 503)
