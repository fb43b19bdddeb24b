"""Per-frame inference metadata shaped like ``gvametaconvert`` output in the seed's example.

``{"objects": [{"detection": {"bounding_box": {...}, "confidence", "label", "label_id"},
"h", "roi_type", "w", "x", "y"}, ...], "resolution": {"height": 720, "width": 1280},
"source": uri, "timestamp": ns}``. Objects drift smoothly from frame to frame;
everything is derived from the instance id, so a run is reproducible.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 1280, 720
LABELS = [(1, "person"), (2, "vehicle"), (3, "bike")]


@dataclass(frozen=True)
class _Track:
    label_id: int
    label: str
    x: float
    y: float
    w: float
    h: float
    phase: float
    speed: float
    confidence: float


class Scene:
    """The objects one instance 'detects'; ``message(n)`` is frame ``n``'s JSON payload."""

    def __init__(self, instance_id: str, source: str, tags: dict[str, Any] | None = None,
                 stream_fps: float = 30.0) -> None:
        rng = random.Random(instance_id)
        self.source = source
        self.tags = tags
        self.frame_ns = 1e9 / stream_fps if stream_fps > 0 else 1e9 / 30
        self.tracks = []
        for _ in range(rng.randint(2, 4)):
            label_id, label = rng.choice(LABELS)
            w, h = rng.uniform(0.05, 0.35), rng.uniform(0.1, 0.6)
            self.tracks.append(_Track(
                label_id, label, rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h,
                rng.uniform(0, 2 * math.pi), rng.uniform(0.005, 0.03), rng.uniform(0.5, 0.99),
            ))

    def objects(self, frame: int) -> list[dict[str, Any]]:
        objects = []
        for t in self.tracks:
            wobble = math.sin(t.phase + frame * t.speed)
            x_min = min(max(t.x + 0.05 * wobble, 0.0), 1.0 - t.w)
            y_min = min(max(t.y + 0.02 * wobble, 0.0), 1.0 - t.h)
            x_max, y_max = x_min + t.w, y_min + t.h
            objects.append({
                "detection": {
                    "bounding_box": {"x_max": x_max, "x_min": x_min, "y_max": y_max, "y_min": y_min},
                    "confidence": min(0.999, t.confidence + 0.01 * wobble),
                    "label": t.label,
                    "label_id": t.label_id,
                },
                "h": round((y_max - y_min) * HEIGHT),
                "roi_type": t.label,
                "w": round((x_max - x_min) * WIDTH),
                "x": round(x_min * WIDTH),
                "y": round(y_min * HEIGHT),
            })
        return objects

    def frame(self, frame: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "objects": self.objects(frame),
            "resolution": {"height": HEIGHT, "width": WIDTH},
            "source": self.source,
            "timestamp": round(frame * self.frame_ns),
        }
        if self.tags:
            message["tags"] = self.tags
        return message

    def message(self, frame: int) -> bytes:
        return json.dumps(self.frame(frame), separators=(",", ":"), sort_keys=True).encode()


def source_name(request: dict[str, Any]) -> str:
    """What metaconvert reports as ``source``: the URI, device or element of the request's source."""
    source = request.get("source") or {}
    for key in ("uri", "device", "element"):
        if isinstance(source.get(key), str):
            return str(source[key])
    return ""
