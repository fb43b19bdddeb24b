"""The Pipeline Server API's response shapes, as plain checks that raise AssertionError.

Transcribed from the real server's OpenAPI spec (``components/schemas``) and
corrected where the real server differs from it: instance ids are strings of
32 lowercase hex digits (``uuid1().hex``), times are floats, ``state`` also has
``QUEUED``, a status has ``message`` and may have ``avg_pipeline_latency``, and
model versions may be integers. Used against the simulated worker and the
balancer alike; :func:`call` is a small HTTP client that keeps everything
(status, content type, raw body) for these checks.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

STATES = ("QUEUED", "RUNNING", "COMPLETED", "ERROR", "ABORTED")
STOPPED = ("COMPLETED", "ERROR", "ABORTED")
ID = re.compile(r"[0-9a-f]{32}")
STATUS_REQUIRED = ("id", "state", "avg_fps", "start_time", "elapsed_time")
STATUS_OPTIONAL = ("message", "avg_pipeline_latency")
PROBLEM_KEYS = {"detail", "status", "title", "type"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ensure(condition: bool, message: str, obj: Any) -> None:
    if not condition:
        raise AssertionError(f"{message}: {json.dumps(obj, default=str)[:500]}")


def check_instance_id(value: Any) -> str:
    """A ``uuid1().hex``: 32 lowercase hex digits (the last 12 are the worker's MAC)."""
    _ensure(isinstance(value, str) and ID.fullmatch(value) is not None, "instance id is not 32 lowercase hex", value)
    return str(value)


def check_status_entry(obj: Any, extra_keys: Iterable[str] = ()) -> dict[str, Any]:
    """``PipelineInstanceStatus`` as the real server answers it (``extra_keys``: fields a proxy may add)."""
    _ensure(isinstance(obj, dict), "status entry is not an object", obj)
    missing = [k for k in STATUS_REQUIRED if k not in obj]
    _ensure(not missing, f"status entry lacks {missing}", obj)
    unknown = set(obj) - set(STATUS_REQUIRED) - set(STATUS_OPTIONAL) - set(extra_keys)
    _ensure(not unknown, f"status entry has unknown keys {sorted(unknown)}", obj)
    check_instance_id(obj["id"])
    _ensure(obj["state"] in STATES, f"state is not one of {STATES}", obj)
    _ensure(_number(obj["avg_fps"]) and obj["avg_fps"] >= 0, "avg_fps is not a number >= 0", obj)
    for key in ("start_time", "elapsed_time"):
        _ensure(obj[key] is None or _number(obj[key]), f"{key} is neither null nor a number", obj)
    if obj["elapsed_time"] is not None:
        _ensure(obj["elapsed_time"] >= 0, "elapsed_time is negative", obj)
    if "message" in obj:
        _ensure(isinstance(obj["message"], str), "message is not a string", obj)
    if "avg_pipeline_latency" in obj:
        _ensure(_number(obj["avg_pipeline_latency"]) and obj["avg_pipeline_latency"] >= 0,
                "avg_pipeline_latency is not a number >= 0", obj)
    if obj["state"] == "QUEUED":
        _ensure(obj["avg_fps"] == 0 and obj["start_time"] is None and obj["elapsed_time"] is None,
                "a QUEUED entry must have avg_fps 0 and null start_time/elapsed_time", obj)
    if obj["state"] == "RUNNING":
        _ensure(_number(obj["start_time"]) and _number(obj["elapsed_time"]),
                "a RUNNING entry must have start_time and elapsed_time", obj)
    return obj


def check_status_list(obj: Any, extra_keys: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``GET /pipelines/status``: a list of status entries, each id once."""
    _ensure(isinstance(obj, list), "status list is not a list", obj)
    entries = [check_status_entry(e, extra_keys) for e in obj]
    ids = [e["id"] for e in entries]
    _ensure(len(ids) == len(set(ids)), "status list repeats an id", obj)
    return entries


def check_summary(obj: Any) -> dict[str, Any]:
    """``PipelineInstanceSummary``: ``{"id", "request": PipelineRequest, "type", ...}``."""
    _ensure(isinstance(obj, dict), "summary is not an object", obj)
    for key in ("id", "request", "type"):
        _ensure(key in obj, f"summary lacks {key!r}", obj)
    check_instance_id(obj["id"])
    _ensure(isinstance(obj["type"], str), "summary type is not a string", obj)
    request = obj["request"]
    _ensure(isinstance(request, dict), "summary request is not an object", obj)
    for key in ("source", "destination", "tags", "parameters"):
        if key in request:
            _ensure(isinstance(request[key], dict), f"request {key} is not an object", obj)
    if "pipeline" in request:
        pipeline = request["pipeline"]
        _ensure(isinstance(pipeline, dict) and isinstance(pipeline.get("name"), str)
                and isinstance(pipeline.get("version"), str), "request pipeline is not {name, version}", obj)
    return obj


def check_pipeline(obj: Any) -> dict[str, Any]:
    """``Pipeline``: one definition (``GET /pipelines/{name}/{version}``)."""
    _ensure(isinstance(obj, dict), "pipeline is not an object", obj)
    for key in ("name", "version", "type", "description"):
        _ensure(key in obj, f"pipeline lacks {key!r}", obj)
    _ensure(isinstance(obj["name"], str) and isinstance(obj["version"], str), "name/version not strings", obj)
    _ensure(obj["type"] in ("GStreamer", "FFmpeg"), "pipeline type is not GStreamer or FFmpeg", obj)
    _ensure(isinstance(obj["description"], str), "pipeline description is not a string", obj)
    if "parameters" in obj:
        _ensure(isinstance(obj["parameters"], dict), "pipeline parameters is not an object", obj)
    return obj


def check_pipelines(obj: Any) -> list[dict[str, Any]]:
    """``GET /pipelines``: a list of definitions."""
    _ensure(isinstance(obj, list), "pipelines is not a list", obj)
    return [check_pipeline(p) for p in obj]


def check_models(obj: Any) -> list[dict[str, Any]]:
    """``GET /models``: a list of ``Model`` (``name``, ``version``, ``type`` IntelDLDT, ...)."""
    _ensure(isinstance(obj, list), "models is not a list", obj)
    for model in obj:
        _ensure(isinstance(model, dict), "model is not an object", model)
        for key in ("name", "version", "type"):
            _ensure(key in model, f"model lacks {key!r}", model)
        _ensure(isinstance(model["name"], str), "model name is not a string", model)
        _ensure(isinstance(model["version"], str | int) and not isinstance(model["version"], bool),
                "model version is neither a string nor an integer", model)
        _ensure(model["type"] == "IntelDLDT", "model type is not IntelDLDT", model)
        if "description" in model:
            _ensure(isinstance(model["description"], str), "model description is not a string", model)
        if "networks" in model:
            _ensure(isinstance(model["networks"], dict), "model networks is not an object", model)
    return obj


def check_problem(obj: Any, status: int | None = None) -> dict[str, Any]:
    """connexion's ``application/problem+json`` body: exactly ``detail``, ``status``, ``title``, ``type``."""
    _ensure(isinstance(obj, dict) and set(obj) == PROBLEM_KEYS, f"problem keys are not {sorted(PROBLEM_KEYS)}", obj)
    _ensure(isinstance(obj["detail"], str) and isinstance(obj["title"], str) and isinstance(obj["type"], str),
            "problem detail/title/type are not strings", obj)
    _ensure(isinstance(obj["status"], int), "problem status is not an integer", obj)
    if status is not None:
        _ensure(obj["status"] == status, f"problem status is not {status}", obj)
    return obj


# ---- HTTP ------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    mimetype: str = field(init=False)

    def __post_init__(self) -> None:
        self.mimetype = self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
         content_type: str | None = "application/json", timeout: float = 5.0) -> Reply:
    """One request; ``body`` is sent as JSON, ``raw`` as is, ``content_type=None`` sends no header."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    headers: dict[str, str] = {}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None and content_type is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def expect_json(reply: Reply, status: int = 200) -> Any:
    """The body of an ``application/json`` reply with this status."""
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.body[:300]!r}"
    assert reply.mimetype == "application/json", f"content type {reply.mimetype!r}: {reply.body[:300]!r}"
    return reply.json()


def expect_error(reply: Reply, message: str, status: int = 400) -> None:
    """A handler error: the message as a JSON string (``"Invalid instance"``), as the real server answers."""
    assert expect_json(reply, status) == message, reply.body


def expect_problem(reply: Reply, status: int) -> dict[str, Any]:
    """A framework error: ``application/problem+json`` with connexion's shape."""
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.body[:300]!r}"
    assert reply.mimetype == "application/problem+json", f"content type {reply.mimetype!r}"
    return check_problem(reply.json(), status)


def expect_instance_id(reply: Reply) -> str:
    """A start's answer: 200, application/json, body ``"<32 hex>"`` plus a newline."""
    value = expect_json(reply)
    assert reply.body == json.dumps(value).encode() + b"\n", reply.body
    return check_instance_id(value)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)
