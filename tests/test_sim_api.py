"""Every route and error of the simulated worker, over HTTP against a real worker process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract import (
    call,
    check_models,
    check_pipeline,
    check_pipelines,
    check_status_entry,
    check_status_list,
    check_summary,
    expect_error,
    expect_instance_id,
    expect_json,
    expect_problem,
    wait_until,
)
from tests.procs import Proc, balancer_cmd, free_port, wait_http

PIPELINE = "/pipelines/object_detection/person_vehicle_bike"
MAC = "02:00:5e:10:20:30"
SUFFIX = "02005e102030"
SEED_BODY = {
    "source": {"uri": "https://github.com/intel-iot-devkit/sample-videos/raw/master/person-bicycle-car-detection.mp4",
               "type": "uri"},
    "parameters": {"detection-device": "CPU"},
}
FILE_SOURCE = {"source": {"type": "uri", "uri": "file:///videos/a.mp4"}}
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    """One worker for the whole module (starting one costs ~0.3 s); its log must hold no traceback."""
    port = free_port()
    proc = Proc(balancer_cmd("worker", "--listen", f"127.0.0.1:{port}", "--mac", MAC, "--noise", "0",
                             "--capacity-fps", "500"), name="worker")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/pipelines", proc=proc.popen)
        yield url
    finally:
        code = proc.stop()
        output = proc.output()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def start(url: str, body: dict[str, Any] | None = None) -> str:
    return expect_instance_id(call("POST", url + PIPELINE, body if body is not None else FILE_SOURCE))


# ---- definitions ----------------------------------------------------------------------
def test_get_pipelines_lists_the_default_pipeline(worker: str) -> None:
    reply = call("GET", worker + "/pipelines")
    pipelines = check_pipelines(expect_json(reply))
    assert reply.body.endswith(b"\n")
    found = [p for p in pipelines if (p["name"], p["version"]) == ("object_detection", "person_vehicle_bike")]
    assert len(found) == 1
    assert found[0]["type"] == "GStreamer"
    assert set(found[0]["parameters"]["properties"]) == {
        "detection-properties", "detection-device", "detection-model-instance-id", "inference-interval", "threshold"}


def test_get_one_pipeline(worker: str) -> None:
    pipeline = check_pipeline(expect_json(call("GET", worker + PIPELINE)))
    assert pipeline["name"] == "object_detection" and pipeline["version"] == "person_vehicle_bike"
    assert pipeline["description"].startswith("Person Vehicle Bike Detection")
    expect_error(call("GET", worker + "/pipelines/object_detection/nope"), "Invalid Pipeline or Version")
    expect_error(call("GET", worker + "/pipelines/nope/person_vehicle_bike"), "Invalid Pipeline or Version")


def test_get_models(worker: str) -> None:
    models = check_models(expect_json(call("GET", worker + "/models")))
    assert [(m["name"], m["version"]) for m in models] == [("object_detection", "person_vehicle_bike")]


# ---- an instance through every route --------------------------------------------------
def test_seed_request_starts_an_instance_seen_on_every_route(worker: str) -> None:
    reply = call("POST", worker + PIPELINE, SEED_BODY)
    instance_id = expect_instance_id(reply)
    assert reply.body == f'"{instance_id}"\n'.encode()
    assert instance_id.endswith(SUFFIX)

    listed = check_status_list(expect_json(call("GET", worker + "/pipelines/status")))
    assert instance_id in [e["id"] for e in listed]
    for path in (f"/pipelines/status/{instance_id}", f"{PIPELINE}/{instance_id}/status"):
        entry = check_status_entry(expect_json(call("GET", worker + path)))
        assert entry["id"] == instance_id
        assert entry["state"] == "RUNNING"
        assert entry["message"] == ""

    for path in (f"/pipelines/{instance_id}", f"{PIPELINE}/{instance_id}"):
        summary = check_summary(expect_json(call("GET", worker + path)))
        assert summary["id"] == instance_id
        assert summary["type"] == "GStreamer"
        request = summary["request"]
        assert request["source"] == SEED_BODY["source"]
        assert request["parameters"]["detection-device"] == "CPU"
        assert request["pipeline"] == {"name": "object_detection", "version": "person_vehicle_bike"}
        assert "gvadetect" in summary["launch_command"]


def test_responses_are_indented_sorted_json_with_a_newline(worker: str) -> None:
    instance_id = start(worker)
    reply = call("GET", worker + f"/pipelines/status/{instance_id}")
    entry = expect_json(reply)
    assert reply.body.decode() == json.dumps(entry, indent=2, sort_keys=True) + "\n"


def test_ids_are_unique_and_share_the_mac_suffix(worker: str) -> None:
    ids = [start(worker) for _ in range(5)]
    assert len(set(ids)) == 5
    assert {i[-12:] for i in ids} == {SUFFIX}


def test_avg_fps_and_times_advance(worker: str) -> None:
    instance_id = start(worker)
    first = check_status_entry(expect_json(call("GET", worker + f"/pipelines/status/{instance_id}")))

    def later() -> dict[str, Any] | None:
        entry = check_status_entry(expect_json(call("GET", worker + f"/pipelines/status/{instance_id}")))
        return entry if entry["elapsed_time"] > first["elapsed_time"] + 0.2 and entry["avg_fps"] > 0 else None

    entry = wait_until(later, what="elapsed time and fps growing")
    assert entry["start_time"] == first["start_time"]
    assert isinstance(entry["avg_fps"], float) and isinstance(entry["elapsed_time"], float)
    assert "avg_pipeline_latency" in entry


@pytest.mark.parametrize("route", ["name_version", "id_only"])
def test_delete_answers_status_then_aborts(worker: str, route: str) -> None:
    instance_id = start(worker)
    path = f"{PIPELINE}/{instance_id}" if route == "name_version" else f"/pipelines/{instance_id}"
    answer = check_status_entry(expect_json(call("DELETE", worker + path)))
    assert answer["id"] == instance_id
    assert answer["state"] == "RUNNING"  # the status at that moment, as the real server answers
    after = check_status_entry(expect_json(call("GET", worker + f"/pipelines/status/{instance_id}")))
    assert after["state"] == "ABORTED"
    again = check_status_entry(expect_json(call("DELETE", worker + path)))
    assert again["state"] == "ABORTED"
    assert again["elapsed_time"] == after["elapsed_time"]
    listed = check_status_list(expect_json(call("GET", worker + "/pipelines/status")))
    assert any(e["id"] == instance_id and e["state"] == "ABORTED" for e in listed)


# ---- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "message"), [
    ("GET", f"/pipelines/status/{UNKNOWN_ID}", "Invalid instance"),
    ("GET", f"{PIPELINE}/{UNKNOWN_ID}/status", "Invalid pipeline, version or instance"),
    ("GET", f"/pipelines/{UNKNOWN_ID}", "Invalid pipeline, version or instance"),
    ("GET", f"{PIPELINE}/{UNKNOWN_ID}", "Invalid pipeline, version or instance"),
    ("DELETE", f"/pipelines/{UNKNOWN_ID}", "Invalid pipeline, version or instance"),
    ("DELETE", f"{PIPELINE}/{UNKNOWN_ID}", "Invalid pipeline, version or instance"),
    ("DELETE", "/pipelines/status", "Invalid pipeline, version or instance"),
])
def test_unknown_instance(worker: str, method: str, path: str, message: str) -> None:
    expect_error(call(method, worker + path), message)


def test_known_instance_under_another_pipeline_name_is_unknown(worker: str) -> None:
    instance_id = start(worker)
    for method, path in [("GET", f"/pipelines/other/v1/{instance_id}"),
                         ("GET", f"/pipelines/other/v1/{instance_id}/status"),
                         ("DELETE", f"/pipelines/object_detection/v2/{instance_id}")]:
        expect_error(call(method, worker + path), "Invalid pipeline, version or instance")
    entry = expect_json(call("GET", worker + f"/pipelines/status/{instance_id}"))
    assert entry["state"] == "RUNNING"


def test_malformed_json_is_a_400_problem(worker: str) -> None:
    problem = expect_problem(call("POST", worker + PIPELINE, raw=b'{"source": '), 400)
    assert problem == {"detail": "Request body is not valid JSON", "status": 400, "title": "Bad Request",
                       "type": "about:blank"}


@pytest.mark.parametrize(("content_type", "shown"), [("text/plain", "text/plain"),
                                                     ("application/x-www-form-urlencoded", None), (None, "")])
def test_wrong_content_type_is_a_415_problem(worker: str, content_type: str | None, shown: str | None) -> None:
    reply = call("POST", worker + PIPELINE, raw=json.dumps(FILE_SOURCE).encode(), content_type=content_type)
    problem = expect_problem(reply, 415)
    assert problem["title"] == "Unsupported Media Type"
    assert problem["detail"] == f"Invalid Content-type ({shown if shown is not None else content_type}), " \
                                "expected JSON data"


@pytest.mark.parametrize(("body", "detail"), [
    ({"source": {"type": "uri"}}, "{'type': 'uri'} is not valid under any of the given schemas - 'source'"),
    ({"parameters": "CPU"}, "'CPU' is not of type 'object' - 'parameters'"),
    ([1], "[1] is not of type 'object'"),
])
def test_body_failing_the_schema_is_a_400_problem(worker: str, body: Any, detail: str) -> None:
    assert expect_problem(call("POST", worker + PIPELINE, body), 400)["detail"] == detail


def test_empty_body_is_a_400_problem(worker: str) -> None:
    problem = expect_problem(call("POST", worker + PIPELINE, raw=b""), 400)
    assert problem["detail"] == "None is not of type 'object'"


def test_schema_is_checked_before_the_pipeline_name(worker: str) -> None:
    expect_problem(call("POST", worker + "/pipelines/nope/v1", {"source": 1}), 400)
    expect_error(call("POST", worker + "/pipelines/nope/v1", FILE_SOURCE), "Invalid Pipeline or Version")


def test_invalid_parameters(worker: str) -> None:
    expect_error(call("POST", worker + PIPELINE, {**FILE_SOURCE, "parameters": {"threshold": "high"}}),
                 "Invalid Parameters")


def test_body_over_10_kib_is_refused(worker: str) -> None:
    body = {**FILE_SOURCE, "tags": {"pad": "x" * 10_300}}
    problem = expect_problem(call("POST", worker + PIPELINE, body), 413)
    assert problem["title"] == "Request Entity Too Large"
    just_under = {**FILE_SOURCE, "tags": {"pad": "x" * 9_000}}
    expect_instance_id(call("POST", worker + PIPELINE, just_under))


@pytest.mark.parametrize("path", ["/", "/nope", "/pipelines/", "/pipelines/a/b/c/d/e", "/models/x"])
def test_unknown_route_is_a_404_problem(worker: str, path: str) -> None:
    assert expect_problem(call("GET", worker + path), 404)["title"] == "Not Found"


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/pipelines"), ("POST", "/models"), ("POST", "/pipelines/status"), ("PATCH", PIPELINE),
    ("DELETE", "/models"),
])
def test_wrong_method_is_a_405_problem(worker: str, method: str, path: str) -> None:
    reply = call(method, worker + path, {})
    assert expect_problem(reply, 405)["title"] == "Method Not Allowed"
    assert reply.headers.get("allow"), reply.headers


def test_post_under_status_falls_through_to_post_pipeline(worker: str) -> None:
    """As with Flask's router: POST /pipelines/status/X is POST /pipelines/{name}/{version}."""
    expect_error(call("POST", worker + f"/pipelines/status/{UNKNOWN_ID}", {}), "Invalid Pipeline or Version")
