"""Facts about instance ids and start requests, as the real Pipeline Server shapes them."""

from __future__ import annotations

import json
import re

MAC_DIGITS = 12
"""uuid1().hex ends with the node's MAC: all instances of one worker share these 12 digits."""

DEVICE_POOLS = ("GPU", "CPU")


def mac_suffix(instance_id: str) -> str | None:
    """The worker MAC inside a uuid1-hex instance id, or None if the id is not that shape."""
    if len(instance_id) == 32 and all(c in "0123456789abcdef" for c in instance_id):
        return instance_id[-MAC_DIGITS:]
    return None


class IdPattern:
    """What an acceptable instance id looks like (configurable; default the real server's uuid1 hex)."""

    def __init__(self, pattern: str) -> None:
        self._regex = re.compile(pattern)

    def accepts(self, instance_id: str) -> bool:
        return self._regex.fullmatch(instance_id) is not None


def parse_instance_id(body: bytes) -> str | None:
    """The id in a worker's answer to a start: a JSON string, e.g. ``"48a3...0001"\\n``."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a body of deeply nested arrays
        return None
    return value if isinstance(value, str) and value else None


def requested_device(body: bytes) -> str | None:
    """The device pool a start request asks for: ``GPU``, ``CPU`` or None (any worker).

    The seed's Helm sample matched ``device.*GPU`` in the raw body; we read the
    JSON: any ``parameters`` key ending in ``-device`` (``detection-device``,
    ``classification-device`` ...). GPU wins if any asks for it (``HETERO:GPU,CPU``
    needs a GPU). A body that is not JSON asks for nothing: the worker will refuse it.
    """
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a body of deeply nested arrays
        return None
    if not isinstance(request, dict) or not isinstance(request.get("parameters"), dict):
        return None
    wanted = ""  # the device values, joined: one substring test per pool (this runs for every start)
    for key, value in request["parameters"].items():
        if isinstance(value, str) and isinstance(key, str) and key.endswith("-device"):
            wanted += value.upper() + " "
    for pool in DEVICE_POOLS:
        if pool in wanted:
            return pool
    return None
