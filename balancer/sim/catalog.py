"""Pipeline and model definitions, read from directories laid out like the real server's.

Pipelines: ``<dir>/<name>/<version>/pipeline.json`` (the real file format). Models:
``<dir>/<name>/<version>/model.json``, holding the fields ``GET /models`` reports for
that model (the simulator has no network files to scan).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("balancer.sim.catalog")

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PIPELINES = PACKAGE_DIR / "pipelines"
DEFAULT_MODELS = PACKAGE_DIR / "models"


class CatalogError(Exception):
    """A definition directory that the real server would refuse to start with."""


def _version(text: str) -> str | int:
    """Model versions that look like integers are integers, as on the real server."""
    return int(text) if text.isdigit() else text


def _json_files(root: Path) -> list[tuple[str, str, Path]]:
    if not root.is_dir():
        raise CatalogError(f"{root} is not a directory")
    found = []
    for path in sorted(root.glob("*/*/*.json")):
        found.append((path.parent.parent.name, path.parent.name, path))
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogError(f"failed to load {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: not a JSON object")
    return data


@dataclass
class Catalog:
    """What ``GET /pipelines`` and ``GET /models`` report, and what a POST may start."""

    pipelines: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def load(pipelines_dir: Path = DEFAULT_PIPELINES, models_dir: Path | None = DEFAULT_MODELS) -> Catalog:
        catalog = Catalog()
        for name, version, path in _json_files(pipelines_dir):
            config = _load(path)
            if "type" not in config or "description" not in config:
                raise CatalogError(f"pipeline {name}/{version} is missing type or description")
            if config["type"] not in ("GStreamer", "FFmpeg"):
                raise CatalogError(f"pipeline {name}/{version} with type {config['type']} not supported")
            if isinstance(config.get("template"), list):
                config["template"] = "".join(config["template"])
            catalog.pipelines[(name, version)] = config
            log.info("loaded pipeline %s/%s from %s", name, version, path)
        if models_dir is not None:
            for name, version, path in _json_files(models_dir):
                catalog.models.append({"name": name, "version": _version(version), **_load(path)})
        return catalog

    def get(self, name: str, version: str) -> dict[str, Any] | None:
        return self.pipelines.get((name, version))

    def describe(self, name: str, version: str) -> dict[str, Any] | None:
        """One pipeline as ``GET /pipelines/{name}/{version}`` shows it."""
        config = self.get(name, version)
        if config is None:
            return None
        entry: dict[str, Any] = {"name": name, "version": version}
        for key in ("type", "description", "parameters"):
            if key in config:
                entry[key] = config[key]
        return entry

    def describe_all(self) -> list[dict[str, Any]]:
        return [d for name, version in self.pipelines if (d := self.describe(name, version)) is not None]

    def launch_command(self, name: str, version: str, request: dict[str, Any]) -> str | None:
        """An approximation of the gst-launch string the real server builds from the template."""
        config = self.get(name, version)
        template = config.get("template") if config else None
        if not isinstance(template, str):
            return None
        source = request.get("source") or {}
        kind = str(source.get("type"))
        element = {"uri": "urisourcebin", "webcam": "v4l2src"}.get(kind, source.get("element", "fakesrc"))
        networks = {(m["name"], str(m["version"])): m for m in self.models}

        def model(match: re.Match[str]) -> str:
            found = networks.get((match.group(1), match.group(2)), {})
            paths = found.get("networks", {}).get("networks", {})
            return str(next(iter(paths.values()), match.group(0)))

        text = template.replace("{auto_source}", f"{element} name=source")
        return re.sub(r"\{models\[([^\]]+)\]\[([^\]]+)\]\[network\]\}", model, text)
