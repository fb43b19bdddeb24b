"""Through the balancer, every route answers with the real Pipeline Server's shapes and content types."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import contract as c
from tests.conftest import WorkerFactory
from tests.lb import FILE_SOURCE, START_PATH, Balancer, start_balancer


@pytest.fixture
def lb(start_worker: WorkerFactory) -> Iterator[Balancer]:
    urls = [start_worker("--noise", "0").url for _ in range(2)]  # type: ignore[attr-defined]
    balancer = start_balancer(urls)
    yield balancer
    balancer.stop()


def test_every_route_keeps_the_workers_contract(lb: Balancer) -> None:
    base = lb.url
    c.check_pipelines(c.expect_json(c.call("GET", base + "/pipelines")))
    c.check_pipeline(c.expect_json(c.call("GET", base + START_PATH)))
    c.check_models(c.expect_json(c.call("GET", base + "/models")))
    ids = [c.expect_instance_id(c.call("POST", base + START_PATH, FILE_SOURCE)) for _ in range(3)]
    merged = c.check_status_list(c.expect_json(c.call("GET", base + "/pipelines/status")))
    assert sorted(e["id"] for e in merged) == sorted(ids)
    for instance_id in ids:
        for path in (f"/pipelines/status/{instance_id}", f"{START_PATH}/{instance_id}/status"):
            assert c.check_status_entry(c.expect_json(c.call("GET", base + path)))["id"] == instance_id
        for path in (f"/pipelines/{instance_id}", f"{START_PATH}/{instance_id}"):
            assert c.check_summary(c.expect_json(c.call("GET", base + path)))["id"] == instance_id
    c.check_status_entry(c.expect_json(c.call("DELETE", f"{base}{START_PATH}/{ids[0]}")))
    c.check_status_entry(c.expect_json(c.call("DELETE", f"{base}/pipelines/{ids[1]}")))
    # the workers' own errors pass through unchanged
    c.expect_problem(c.call("POST", base + START_PATH, raw=b"{oops"), 400)
    c.expect_problem(c.call("POST", base + START_PATH, raw=b"{}", content_type="text/plain"), 415)
    c.expect_error(c.call("POST", base + "/pipelines/no/such", FILE_SOURCE), "Invalid Pipeline or Version")
    unknown = "0" * 32
    c.expect_error(c.call("GET", f"{base}{START_PATH}/{unknown}"), "Invalid pipeline, version or instance")
    c.expect_error(c.call("GET", f"{base}/pipelines/status/{unknown}"), "Invalid instance")
