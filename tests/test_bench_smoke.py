"""Each benchmark's smoke mode, run for real: it completes and writes its JSON (and plot) with the expected keys.

No figure is checked: the machine is shared and the smoke runs are a few seconds long.
The benchmarks need wrk, haproxy and nginx (Debian packages wrk, haproxy, nginx-light)
and matplotlib; a missing one fails the test with the package to install.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench import common

BENCHMARKS = {
    "proxy": (("wrk", "haproxy", "nginx"), {"summary": ("cells", "ratios")}),
    "burst": (("haproxy",), {}),
    "density": (("haproxy",), {}),
    "merged_status": (("wrk", "haproxy"), {"rss": ("rss_mb_after_polls", "peak_rss_mb")}),
}
COMMON_KEYS = ("benchmark", "title", "command", "date", "commit", "machine", "params", "configs", "runs", "summary",
               "targets", "duration_s")


def require(tools: tuple[str, ...]) -> None:
    try:
        common.require_tools(*tools)
    except common.MissingTool as exc:
        pytest.fail(f"benchmark tools missing: {exc}")
    if importlib.util.find_spec("matplotlib") is None:
        pytest.fail("matplotlib is not installed: python3 -m pip install 'matplotlib>=3.7'")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_smoke(name: str, tmp_path: Path) -> None:
    tools, nested = BENCHMARKS[name]
    require(tools)
    proc = subprocess.run([sys.executable, "-m", f"scripts.bench.{name}", "--smoke", "--out", str(tmp_path)],
                          cwd=common.REPO, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((tmp_path / "smoke.json").read_text())
    missing = [k for k in COMMON_KEYS if k not in doc]
    assert not missing, f"smoke.json lacks {missing}"
    assert doc["benchmark"] == name and doc["params"]["smoke"] is True
    assert doc["runs"], "no run recorded"
    for key, inner in nested.items():
        assert all(k in doc[key] for k in inner), f"{key} lacks one of {inner}: {sorted(doc[key])}"
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert (tmp_path / "smoke.md").read_text().strip()
