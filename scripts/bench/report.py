"""Put the latest results into docs/benchmarks.md.

Each benchmark's section in the document sits between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; this replaces it with ``bench-results/NAME/latest.md``,
a line saying when, on what and with which command it was measured, and the plot.
The prose around the markers is left alone.

    python3 -m scripts.bench.report [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.bench.common import REPO, RESULTS

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
        text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
    args.doc.write_text(text)
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
