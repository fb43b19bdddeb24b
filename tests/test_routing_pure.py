"""Routing table, request parsing, status merging and configuration: pure functions."""

from __future__ import annotations

import json

import pytest

from balancer.config import ConfigError, load_config
from balancer.instance import IdPattern, mac_suffix, parse_instance_id, requested_device
from balancer.proxy import end_to_end, forwarded_headers
from balancer.routes import (
    ANY,
    BAD_METHOD,
    BAD_PATH,
    INSTANCE,
    NOT_FOUND,
    START,
    STATUS_ALL,
    UNKNOWN_INSTANCE_STATUS,
    classify,
)
from balancer.status import merge_status_lists, parse_status_list

ID = "48a335a2eb3511f181f302fc00000001"


@pytest.mark.parametrize(
    ("method", "path", "kind", "instance"),
    [
        ("POST", "/pipelines/object_detection/person_vehicle_bike", START, ""),
        ("GET", "/pipelines/object_detection/person_vehicle_bike", ANY, ""),
        ("GET", "/pipelines", ANY, ""),
        ("GET", "/models", ANY, ""),
        ("GET", "/pipelines/status", STATUS_ALL, ""),
        ("GET", f"/pipelines/status/{ID}", INSTANCE, ID),
        ("GET", f"/pipelines/{ID}", INSTANCE, ID),
        ("DELETE", f"/pipelines/{ID}", INSTANCE, ID),
        ("GET", f"/pipelines/a/b/{ID}", INSTANCE, ID),
        ("DELETE", f"/pipelines/a/b/{ID}", INSTANCE, ID),
        ("GET", f"/pipelines/a/b/{ID}/status", INSTANCE, ID),
        ("HEAD", "/pipelines/status", STATUS_ALL, ""),
        ("GET", "/", NOT_FOUND, ""),
        ("GET", "/nope", NOT_FOUND, ""),
        ("GET", "/pipelines/a/b/c/d/e", NOT_FOUND, ""),
        ("GET", "/pipelines//status", NOT_FOUND, ""),
        ("GET", "/pipelines/", NOT_FOUND, ""),
        ("DELETE", "/pipelines/status", BAD_METHOD, ""),
        ("POST", f"/pipelines/{ID}", BAD_METHOD, ""),
        ("PUT", "/pipelines/a/b", BAD_METHOD, ""),
        ("GET", "/pipelines/../models", BAD_PATH, ""),
        ("GET", "/pipelines/a%2Fb/c", BAD_PATH, ""),
        ("GET", "/pipelines/%2e%2e/c", BAD_PATH, ""),
        ("GET", "pipelines", BAD_PATH, ""),
        ("GET", "/pipelines/" + "x" * 3000, BAD_PATH, ""),
    ],
)
def test_classify(method: str, path: str, kind: str, instance: str) -> None:
    route = classify(method, path)
    assert route.kind == kind
    assert route.instance_id == instance


def test_status_by_id_has_its_own_unknown_answer() -> None:
    assert classify("GET", f"/pipelines/status/{ID}").unknown_answer == UNKNOWN_INSTANCE_STATUS
    assert classify("DELETE", "/pipelines/status").allow == "GET"


def test_instance_ids_and_start_answers() -> None:
    assert mac_suffix(ID) == "02fc00000001"
    assert mac_suffix("XYZ") is None
    assert parse_instance_id(json.dumps(ID).encode() + b"\n") == ID
    assert parse_instance_id(b'{"id": 1}') is None
    assert parse_instance_id(b"not json") is None
    pattern = IdPattern(r"[0-9a-f]{32}")
    assert pattern.accepts(ID) and not pattern.accepts(ID.upper()) and not pattern.accepts(ID + "0")


@pytest.mark.parametrize(
    ("body", "device"),
    [
        ({"parameters": {"detection-device": "GPU"}}, "GPU"),
        ({"parameters": {"detection-device": "CPU", "classification-device": "GPU"}}, "GPU"),
        ({"parameters": {"detection-device": "cpu"}}, "CPU"),
        ({"parameters": {"detection-device": "HETERO:GPU,CPU"}}, "GPU"),
        ({"parameters": {"threshold": 0.5}}, None),
        ({"parameters": "GPU"}, None),
        ({"source": {"device": "GPU"}}, None),
        ([], None),
    ],
)
def test_requested_device(body: object, device: str | None) -> None:
    assert requested_device(json.dumps(body).encode()) == device


def test_requested_device_of_garbage() -> None:
    assert requested_device(b"{not json") is None


def test_parse_status_list_is_strict() -> None:
    good = json.dumps([{"id": ID, "state": "QUEUED", "avg_fps": 0, "start_time": None, "elapsed_time": None}])
    assert parse_status_list(good.encode())[0].state == "QUEUED"
    for bad in [b"<html>", b'{"a": 1}', b"[1]", b'[{"state": "RUNNING"}]', b'[{"id": "x", "state": "ON"}]',
                b'[{"id": "x", "state": "RUNNING", "avg_fps": "fast"}]']:
        with pytest.raises(ValueError):
            parse_status_list(bad)


def test_merge_keeps_entries_and_names_missing_workers() -> None:
    a = [{"id": "1", "state": "RUNNING", "avg_fps": 30.0, "extra": [1]}]
    b = [{"id": "2", "state": "COMPLETED"}]
    merged = merge_status_lists(
        [("a", json.dumps(a).encode()), ("down", None), ("b", json.dumps(b).encode()), ("bad", b'{"x":1}')]
    )
    assert json.loads(merged.body) == a + b
    assert merged.missing == ["down", "bad"]


def test_headers() -> None:
    headers = [("Host", "lb"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
               ("Transfer-Encoding", "chunked"), ("Content-Type", "application/json"), ("Content-Length", "3"),
               ("X-Forwarded-For", "10.0.0.1")]
    out = forwarded_headers(headers, "127.0.0.9")
    assert out == [("Content-Type", "application/json"), ("X-Forwarded-For", "10.0.0.1, 127.0.0.9")]
    assert end_to_end([("Upgrade", "h2c"), ("Date", "x")]) == [("Date", "x")]


class TestConfig:
    def test_precedence_defaults_file_env_options(self, tmp_path: object) -> None:
        from pathlib import Path

        path = Path(str(tmp_path)) / "c.yaml"
        path.write_text("admission:\n  max_running_pipelines: 3\n  target_fps: 25\ndiscovery:\n"
                        "  workers: [http://a:1, http://b:2]\n")
        cfg = load_config(str(path), {"TARGET_FPS": "30"}, {"admission.max_running_pipelines": 4})
        assert cfg.admission.max_running_pipelines == 4
        assert cfg.admission.target_fps == 30.0
        assert cfg.discovery.workers == ("http://a:1", "http://b:2")
        assert cfg.server.listen == "0.0.0.0:31000"

    def test_every_bad_value_is_reported(self) -> None:
        with pytest.raises(ConfigError) as err:
            load_config(None, {"WORKERS": "ftp://x", "POLL_INTERVAL": "0", "MAX_RUNNING_PIPELINES": "two",
                               "LISTEN": "nope", "LOG_FORMAT": "xml"})
        text = str(err.value)
        for needle in ("ftp://x", "$POLL_INTERVAL", "$MAX_RUNNING_PIPELINES", "$LISTEN", "$LOG_FORMAT"):
            assert needle in text

    def test_bad_label_selector_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError, match="not a valid label selector"):
            load_config(None, {"DISCOVERY": "kubernetes", "SELECTOR": "app in (a"})

    def test_unknown_keys_in_file(self, tmp_path: object) -> None:
        from pathlib import Path

        path = Path(str(tmp_path)) / "c.yaml"
        path.write_text("admision:\n  x: 1\nhealth:\n  poll_intervall: 2\n")
        with pytest.raises(ConfigError) as err:
            load_config(str(path), {"WORKERS": "http://a:1"})
        assert "admision" in str(err.value) and "health.poll_intervall" in str(err.value)

    def test_config_is_frozen(self) -> None:
        cfg = load_config(None, {"WORKERS": "http://a:1"})
        with pytest.raises(AttributeError):
            cfg.admission.max_running_pipelines = 3  # type: ignore[misc]
