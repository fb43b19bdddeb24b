"""Regenerate the README's configuration table from balancer/config.py (the one source of truth).

    python3 scripts/config_table.py          # rewrite README.md in place
    python3 scripts/config_table.py --check  # exit 1 if README.md is out of date (the tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from balancer.config import env_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    rows = ["| setting (YAML `group: {field: …}`) | environment | default | meaning |", "|---|---|---|---|"]
    for dotted, env, default, doc in env_table():
        shown = ",".join(default) if isinstance(default, tuple) else default
        escaped = doc.replace("|", "\\|")
        rows.append(f"| `{dotted}` | `{env}` | `{shown}` | {escaped} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    fresh = render(text)
    if "--check" in sys.argv:
        if fresh != text:
            print("README.md's configuration table is out of date: run python3 scripts/config_table.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
