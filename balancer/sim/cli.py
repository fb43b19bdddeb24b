"""``pipeline-balancer worker``: the simulated Pipeline Server (being written: see issue 2)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("worker", help="run a simulated Pipeline Server worker")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("pipeline-balancer worker: not built yet")
