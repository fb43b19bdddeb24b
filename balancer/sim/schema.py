"""Request validation as the real server does it, without a JSON-Schema dependency.

The real server (connexion 2 on Flask) checks the body against the OpenAPI
``PipelineRequest`` schema with a Draft 4 validator and reports the first error
as ``"<message> - '<path>'"``; then the pipeline manager checks ``parameters``
against the pipeline definition's own schema (``"Invalid Parameters"``). This
module implements the Draft 4 subset those schemas use, with jsonschema's
wording, so error bodies match.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s]*")

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


@dataclass
class SchemaError:
    message: str
    path: list[str | int] = field(default_factory=list)

    def detail(self) -> str:
        """connexion's ``detail``: the message, then `` - 'a.b'`` when the error is below the root."""
        where = ".".join(str(p) for p in self.path)
        return f"{self.message} - '{where}'" if where else self.message


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES.get(name, (object,)))


def iter_errors(value: Any, schema: dict[str, Any], path: tuple[str | int, ...] = ()) -> Iterator[SchemaError]:
    """Errors in the order jsonschema finds them: schema keywords in their written order."""
    for keyword, arg in schema.items():
        yield from _check(keyword, arg, value, schema, path)


def _check(keyword: str, arg: Any, value: Any, schema: dict[str, Any], path: tuple[str | int, ...]
           ) -> Iterator[SchemaError]:
    here = list(path)
    if keyword == "type":
        names = arg if isinstance(arg, list) else [arg]
        if not any(_is_type(value, n) for n in names):
            yield SchemaError(f"{value!r} is not of type {', '.join(repr(n) for n in names)}", here)
    elif keyword == "enum" and value not in arg:
        yield SchemaError(f"{value!r} is not one of {arg!r}", here)
    elif keyword == "required" and isinstance(value, dict):
        for name in arg:
            if name not in value:
                yield SchemaError(f"{name!r} is a required property", here)
    elif keyword == "properties" and isinstance(value, dict):
        for name, sub in arg.items():
            if name in value and isinstance(sub, dict):
                yield from iter_errors(value[name], sub, (*path, name))
    elif keyword == "additionalProperties" and isinstance(value, dict):
        extra = [k for k in value if k not in schema.get("properties", {})]
        if arg is False and extra:
            yield SchemaError(f"Additional properties are not allowed ({', '.join(map(repr, extra))} "
                              f"{'was' if len(extra) == 1 else 'were'} unexpected)", here)
        elif isinstance(arg, dict):
            for name in extra:
                yield from iter_errors(value[name], arg, (*path, name))
    elif keyword == "items" and isinstance(value, list) and isinstance(arg, dict):
        for index, item in enumerate(value):
            yield from iter_errors(item, arg, (*path, index))
    elif keyword == "oneOf":
        matches = [sub for sub in arg if not any(True for _ in iter_errors(value, sub, path))]
        if not matches:
            yield SchemaError(f"{value!r} is not valid under any of the given schemas", here)
        elif len(matches) > 1:
            yield SchemaError(f"{value!r} is valid under each of {', '.join(map(repr, matches))}", here)
    elif keyword == "anyOf":
        if not any(not any(True for _ in iter_errors(value, sub, path)) for sub in arg):
            yield SchemaError(f"{value!r} is not valid under any of the given schemas", here)
    elif keyword == "allOf":
        for sub in arg:
            yield from iter_errors(value, sub, path)
    else:
        yield from _check_scalar(keyword, arg, value, here)


def _check_scalar(keyword: str, arg: Any, value: Any, here: list[str | int]) -> Iterator[SchemaError]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if keyword == "minimum" and number and value < arg:
        yield SchemaError(f"{value!r} is less than the minimum of {arg!r}", here)
    elif keyword == "maximum" and number and value > arg:
        yield SchemaError(f"{value!r} is greater than the maximum of {arg!r}", here)
    elif keyword == "minLength" and isinstance(value, str) and len(value) < arg:
        yield SchemaError(f"{value!r} is too short", here)
    elif keyword == "maxLength" and isinstance(value, str) and len(value) > arg:
        yield SchemaError(f"{value!r} is too long", here)
    elif keyword == "pattern" and isinstance(value, str) and not re.search(arg, value):
        yield SchemaError(f"{value!r} does not match {arg!r}", here)
    elif keyword == "format" and arg == "uri" and isinstance(value, str) and not _URI.fullmatch(value):
        yield SchemaError(f"{value!r} is not a {arg!r}", here)


def first_error(value: Any, schema: dict[str, Any]) -> SchemaError | None:
    return next(iter_errors(value, schema), None)


# ---- the OpenAPI PipelineRequest schema (reference/pipeline-server-openapi.yaml) ----------
def _source(kind: str, required: str, **props: Any) -> dict[str, Any]:
    return {
        "properties": {
            "type": {"enum": [kind], "type": "string"},
            **props,
            "properties": {"type": "object"},
            "capsfilter": {"type": "string"},
            "postproc": {"type": "string"},
        },
        "required": ["type", required],
        "type": "object",
    }


def _broker(kind: str) -> dict[str, Any]:
    return {
        "properties": {"host": {"type": "string"}, "topic": {"type": "string"},
                       "type": {"enum": [kind], "type": "string"}},
        "required": ["host", "topic"],
        "type": "object",
    }


METADATA_DESTINATION: dict[str, Any] = {
    "oneOf": [
        _broker("kafka"),
        _broker("mqtt"),
        {
            "properties": {"type": {"enum": ["file"], "type": "string"}, "path": {"type": "string"}},
            "required": ["type", "path"],
            "type": "object",
        },
    ],
    "type": "object",
}

FRAME_DESTINATION: dict[str, Any] = {
    "oneOf": [{
        "properties": {
            "type": {"enum": ["rtsp"], "type": "string"},
            "path": {"type": "string", "minLength": 1, "pattern": "^[a-zA-Z0-9][a-zA-Z0-9_/-]*[a-zA-Z0-9]$"},
        },
        "required": ["type", "path"],
        "type": "object",
    }],
    "type": "object",
}

PIPELINE_REQUEST: dict[str, Any] = {
    "properties": {
        "source": {
            "oneOf": [
                _source("uri", "uri", uri={"format": "uri", "type": "string"}),
                _source("gst", "element", element={"type": "string"}),
                _source("webcam", "device", device={"type": "string"}),
            ],
            "type": "object",
        },
        "destination": {
            "oneOf": [
                METADATA_DESTINATION,
                {"anyOf": [
                    {"type": "object", "properties": {"frame": FRAME_DESTINATION}, "required": ["frame"]},
                    {"type": "object", "properties": {"metadata": METADATA_DESTINATION}, "required": ["metadata"]},
                ]},
            ],
            "type": "object",
        },
        "tags": {"type": "object"},
        "parameters": {"type": "object"},
    },
    "type": "object",
}

MQTT_PROPERTIES: dict[str, Any] = {
    "properties": {"mqtt-client-id": {"type": "string"}, "timeout": {"type": "integer"}},
}


def check_request(body: Any) -> SchemaError | None:
    """The connexion body check: the first error against ``PipelineRequest``."""
    return first_error(body, PIPELINE_REQUEST)


def normalize(request: dict[str, Any], parameters_schema: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """The pipeline manager's defaults and checks: ``(request, None)`` or ``(request, "Invalid …")``.

    A flat metadata destination moves under ``destination.metadata`` and parameter
    defaults from the pipeline definition are filled in, as the real server does.
    """
    request = dict(request)
    properties = (parameters_schema or {}).get("properties", {})
    params = dict(request.get("parameters") or {})
    for key, spec in properties.items():
        if key not in params and isinstance(spec, dict) and "default" in spec:
            params[key] = spec["default"]
    if params or "parameters" in request:
        request["parameters"] = params
    destination = request.get("destination")
    if isinstance(destination, dict) and "type" in destination:
        request["destination"] = {"metadata": destination}
    if "parameters" in request and parameters_schema and first_error(request["parameters"], parameters_schema):
        return request, "Invalid Parameters"
    metadata = (request.get("destination") or {}).get("metadata")
    if isinstance(metadata, dict) and metadata.get("type") == "mqtt" and first_error(metadata, MQTT_PROPERTIES):
        return request, "Invalid Destination"
    return request, None
