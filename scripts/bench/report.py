"""Put the latest results into docs/benchmarks.md.

Each benchmark's section in the document sits between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; this replaces it with ``bench-results/NAME/latest.md``,
a line saying when, on what and with which command it was measured, and the plot.
The prose around the markers is left alone.

    python3 -m scripts.bench.report [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench.common import REPO, RESULTS, fmt, table

NAMES = ("proxy", "burst", "density", "merged_status")


def section(name: str, doc_path: Path) -> str | None:
    folder = RESULTS / name
    json_path, md_path, png_path = folder / "latest.json", folder / "latest.md", folder / "latest.png"
    if not json_path.exists() or not md_path.exists():
        return None
    doc = json.loads(json_path.read_text())
    m = doc["machine"]
    load = "/".join(f"{x:.1f}" for x in m["loadavg"])
    load_end = "/".join(f"{x:.1f}" for x in m.get("loadavg_end", []))
    image = Path("..") / png_path.relative_to(REPO) if doc_path.parent.name == "docs" else png_path.relative_to(REPO)
    return (f"Measured {doc['date']} on balancer {doc['commit']} ({doc['balancer_source']}), {m['cpus']} CPUs, "
            f"load average {load} at start and {load_end} at the end, in {doc['duration_s']:.0f} s: "
            f"`{doc['command']}`.\n\n{md_path.read_text().strip()}\n\n![{doc['title']}]({image.as_posix()})")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name / "latest.json"
    return json.loads(path.read_text()) if path.exists() else None


def target_rows() -> list[list[str]]:
    """One row per target of the issue: what was measured and whether it is met (reported, never asserted)."""
    rows: list[list[str]] = []
    proxy = _load("proxy")
    if proxy:
        for r in proxy["summary"]["ratios"]:
            request = "POST start" if r["request"] == "post" else "GET status"
            if r["connections"] == 1:
                measured = f"added p50 ratio {fmt(r['added_p50'])} (p50 ratio {fmt(r['p50'])})"
            else:
                measured = f"req/s ratio {fmt(r['rps'])}, p99 ratio {fmt(r['p99'])}"
            rows.append([f"proxy, {request}, {r['connections']} conn, {r['config']}", r["target"], measured,
                         "yes" if r["met"] else "**no**"])
    burst = _load("burst")
    if burst:
        for r in burst["summary"]:
            if r["config"] == "haproxy":
                continue
            met = r["exact_runs"] == r["runs"]
            rows.append([f"burst {r['burst']}, {r['config']}", f"overshoot 0, admitted {r['expected_admitted']}",
                         f"admitted {fmt(r['admitted'], 0)}, overshoot {fmt(r['overshoot'], 0)} "
                         f"(exact in {r['exact_runs']}/{r['runs']} runs)", "yes" if met else "**no**"])
    density = _load("density")
    if density:
        for r in density["summary"]:
            if r["config"] == "haproxy":
                continue
            met = r["met_runs"] == r["runs"]
            rows.append([f"density, {r['config']}", f"admitted {r['theoretical']}, 0 below target",
                         f"admitted {fmt(r['admitted'], 0)}, below target {fmt(r['below_target'], 0)} "
                         f"(met in {r['met_runs']}/{r['runs']} runs)", "yes" if met else "**no**"])
    merged = _load("merged_status")
    if merged:
        for r in merged["summary"]:
            if r["config"] == "balancer-50" and r["connections"] == 1:
                limit = merged["targets"]["p50_ms_50x20_max"]
                rows.append(["merged status, 50 workers x 20, 1 conn", f"p50 <= {limit:g} ms",
                             f"p50 {fmt(r['p50_ms'])} ms", "yes" if r["p50_ms"] <= limit else "**no**"])
        rss = merged["rss"]
        limit = merged["targets"]["rss_mb_100_workers_max"]
        rows.append([f"balancer RSS, {rss['workers']} workers known", f"<= {limit:g} MB",
                     f"peak {fmt(rss['peak_rss_mb'], 1)} MB", "yes" if rss["peak_rss_mb"] <= limit else "**no**"])
    return rows


def _splice(body: str, match: re.Match[str]) -> str:
    """Keep the markers, replace what is between them."""
    return match.group(1) + body + match.group(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    text = args.doc.read_text()
    for name in NAMES:
        body = section(name, args.doc)
        if body is None:
            print(f"{name}: no latest results; section left as it is")
            continue
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            print(f"{name}: no <!-- bench:{name} --> markers in {args.doc}", file=sys.stderr)
            return 1
        text = pattern.sub(functools.partial(_splice, body), text)
    rows = target_rows()
    if rows:
        body = table(["target", "wanted", "measured (medians)", "met"], rows)
        text = re.sub(r"(<!-- bench:targets -->\n).*?(\n<!-- /bench:targets -->)",
                      functools.partial(_splice, body), text, flags=re.DOTALL)
    args.doc.write_text(text)
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
