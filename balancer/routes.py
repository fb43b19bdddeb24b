"""The routing table (DESIGN §2) as one pure function from (method, raw path) to a route."""

from __future__ import annotations

from dataclasses import dataclass

START, INSTANCE, STATUS_ALL, ANY, NOT_FOUND, BAD_METHOD, BAD_PATH = (
    "start", "instance", "status_all", "any", "not_found", "method_not_allowed", "bad_path",
)

MAX_PATH = 2048

# What the real worker answers for an instance it does not know, by route (see DESIGN §1).
UNKNOWN_INSTANCE = "Invalid pipeline, version or instance"
UNKNOWN_INSTANCE_STATUS = "Invalid instance"


@dataclass(frozen=True)
class Route:
    kind: str
    """One of the constants above; also the ``route`` label of the request metrics."""
    instance_id: str = ""
    allow: str = ""
    """For ``method_not_allowed``: the methods the path takes."""
    detail: str = ""
    unknown_answer: str = UNKNOWN_INSTANCE
    """What the worker says for an instance it does not own on this path."""


_MEMO: dict[tuple[str, str], Route] = {}
MEMO_SIZE = 4096
"""Routes remembered: the function is pure and runs per request. A client can make the memo start
over, never grow past this; paths longer than :data:`MEMO_PATH` are not remembered."""
MEMO_PATH = 200


def classify(method: str, raw_path: str) -> Route:
    """Where a request goes, from its method and its raw (still percent-encoded) path.

    The raw path is what is forwarded, so it is also what is judged: ``%2F`` could
    turn one segment into two past a decoder, and ``..`` could climb out of the API.
    """
    key = (method, raw_path)
    route = _MEMO.get(key)
    if route is None:
        route = _classify(method, raw_path)
        if len(raw_path) <= MEMO_PATH:
            if len(_MEMO) >= MEMO_SIZE:
                _MEMO.clear()
            _MEMO[key] = route
    return route


def _classify(method: str, raw_path: str) -> Route:
    if len(raw_path) > MAX_PATH:
        return Route(BAD_PATH, detail=f"path longer than {MAX_PATH} bytes")
    if not raw_path.startswith("/"):
        return Route(BAD_PATH, detail="path must start with /")
    segments = raw_path[1:].split("/")
    for seg in segments:
        lowered = seg.lower()
        if seg in (".", "..") or "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "\\" in seg:
            return Route(BAD_PATH, detail="path segments may not be '.', '..' or hold encoded slashes")
    if "" in segments:
        return Route(NOT_FOUND)

    head, rest = segments[0], segments[1:]
    if head == "models" and not rest:
        return _allow(method, "GET", Route(ANY))
    if head != "pipelines":
        return Route(NOT_FOUND)
    if not rest:
        return _allow(method, "GET", Route(ANY))
    if rest == ["status"]:
        return _allow(method, "GET", Route(STATUS_ALL))
    if len(rest) == 1:
        return _allow(method, "GET, DELETE", Route(INSTANCE, instance_id=rest[0]))
    if len(rest) == 2:
        if rest[0] == "status" and method == "GET":
            return Route(INSTANCE, instance_id=rest[1], unknown_answer=UNKNOWN_INSTANCE_STATUS)
        if method == "POST":
            return Route(START)
        return _allow(method, "GET, POST", Route(ANY))
    if len(rest) == 3:
        return _allow(method, "GET, DELETE", Route(INSTANCE, instance_id=rest[2]))
    if len(rest) == 4 and rest[3] == "status":
        return _allow(method, "GET", Route(INSTANCE, instance_id=rest[2]))
    return Route(NOT_FOUND)


def _allow(method: str, allowed: str, route: Route) -> Route:
    methods = allowed.split(", ")
    if method in methods or (method == "HEAD" and "GET" in methods):
        return route
    return Route(BAD_METHOD, allow=allowed)
