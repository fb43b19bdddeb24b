"""Request validation of the simulated worker: connexion's first error, with jsonschema's wording."""

from __future__ import annotations

from typing import Any

import pytest

from balancer.sim.catalog import Catalog
from balancer.sim.schema import check_request, first_error, normalize

SEED_REQUEST = {
    "source": {"uri": "https://github.com/intel-iot-devkit/sample-videos/raw/master/person-bicycle-car-detection.mp4",
               "type": "uri"},
    "destination": {"metadata": {"type": "mqtt", "host": "10.0.0.1:1883", "topic": "dlstreamer"}},
    "parameters": {"detection-device": "CPU"},
}


@pytest.mark.parametrize("body", [
    SEED_REQUEST,
    {},
    {"source": {"type": "gst", "element": "videotestsrc"}},
    {"source": {"type": "webcam", "device": "/dev/video0"}},
    {"source": {"type": "uri", "uri": "rtsp://cam/1", "properties": {"sim-frames": 10}}},
    {"destination": {"type": "mqtt", "host": "h:1883", "topic": "t"}},  # the legacy flat form
    {"destination": {"type": "file", "path": "/tmp/x.jsonl"}},
    {"destination": {"frame": {"type": "rtsp", "path": "cam1"}}},
    {"tags": {"camera": 1}, "parameters": {}},
])
def test_valid_requests(body: dict[str, Any]) -> None:
    assert check_request(body) is None


@pytest.mark.parametrize(("body", "detail"), [
    (None, "None is not of type 'object'"),
    ([], "[] is not of type 'object'"),
    ({"source": {"type": "uri"}}, "{'type': 'uri'} is not valid under any of the given schemas - 'source'"),
    ({"source": {"type": "uri", "uri": "not a uri"}},
     "{'type': 'uri', 'uri': 'not a uri'} is not valid under any of the given schemas - 'source'"),
    ({"source": "file.mp4"}, "'file.mp4' is not valid under any of the given schemas - 'source'"),
    ({"destination": {"metadata": {"type": "mqtt", "topic": "t"}}},
     "{'metadata': {'type': 'mqtt', 'topic': 't'}} is not valid under any of the given schemas - 'destination'"),
    ({"tags": []}, "[] is not of type 'object' - 'tags'"),
    ({"parameters": 3}, "3 is not of type 'object' - 'parameters'"),
])
def test_invalid_requests_report_the_first_error(body: Any, detail: str) -> None:
    error = check_request(body)
    assert error is not None
    assert error.detail() == detail


@pytest.mark.parametrize(("value", "schema", "message"), [
    (True, {"type": "integer"}, "True is not of type 'integer'"),
    (1.5, {"type": "integer"}, "1.5 is not of type 'integer'"),
    ("x", {"enum": ["a", "b"]}, "'x' is not one of ['a', 'b']"),
    (5, {"minimum": 6}, "5 is less than the minimum of 6"),
    (7, {"maximum": 6}, "7 is greater than the maximum of 6"),
    ("", {"minLength": 1}, "'' is too short"),
    ("-x", {"pattern": "^[a-z]"}, "'-x' does not match '^[a-z]'"),
    ({"a": 1}, {"additionalProperties": False}, "Additional properties are not allowed ('a' was unexpected)"),
    ([1, "x"], {"items": {"type": "integer"}}, "'x' is not of type 'integer'"),
    (1, {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1 is valid under each of {'type': 'integer'}, "
                                                             "{'type': 'number'}"),
    (1, {"allOf": [{"type": "string"}]}, "1 is not of type 'string'"),
])
def test_draft4_keywords(value: Any, schema: dict[str, Any], message: str) -> None:
    error = first_error(value, schema)
    assert error is not None and error.message == message


def test_normalize_moves_a_flat_destination_and_fills_defaults() -> None:
    config = Catalog.load().get("object_detection", "person_vehicle_bike")
    assert config is not None
    flat = {"source": {"type": "uri", "uri": "file:///a.mp4"},
            "destination": {"type": "mqtt", "host": "h:1", "topic": "t"}}
    request, error = normalize(flat, config["parameters"])
    assert error is None
    assert request["destination"] == {"metadata": {"type": "mqtt", "host": "h:1", "topic": "t"}}
    assert request["parameters"] == {"detection-device": "{env[DETECTION_DEVICE]}"}
    assert flat["destination"] == {"type": "mqtt", "host": "h:1", "topic": "t"}  # the input is not changed


@pytest.mark.parametrize(("body", "error"), [
    ({"parameters": {"threshold": "high"}}, "Invalid Parameters"),
    ({"parameters": {"inference-interval": 1.5}}, "Invalid Parameters"),
    ({"parameters": {"inference-interval": 2, "threshold": 0.5, "unknown": 1}}, None),
    ({"destination": {"metadata": {"type": "mqtt", "host": "h", "topic": "t", "timeout": "x"}}},
     "Invalid Destination"),
])
def test_pipeline_checks(body: dict[str, Any], error: str | None) -> None:
    config = Catalog.load().get("object_detection", "person_vehicle_bike")
    assert config is not None
    assert normalize(body, config["parameters"])[1] == error
