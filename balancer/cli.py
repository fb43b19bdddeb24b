"""``pipeline-balancer``: serve (the balancer), worker (a simulated Pipeline Server), demo (both)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from balancer import __version__

# command-line option -> "group.field" in balancer.config.Config
SERVE_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--listen", "server.listen", {"metavar": "HOST:PORT", "help": "API address (default 0.0.0.0:31000)"}),
    ("--workers", "discovery.workers", {"metavar": "URL,URL", "help": "static worker URLs"}),
    ("--namespace", "discovery.namespace", {"help": "Kubernetes namespace to watch"}),
    ("--selector", "discovery.selector", {"help": "worker pod label selector (default app=pipeline-server)"}),
    ("--worker-port", "discovery.worker_port", {"type": int, "help": "worker REST port (default 8080)"}),
    ("--device-label", "discovery.device_label", {"help": "pod label naming the device pool"}),
    ("--max-running-pipelines", "admission.max_running_pipelines", {"type": int, "metavar": "N"}),
    ("--target-fps", "admission.target_fps", {"type": float, "metavar": "FPS"}),
    ("--predictive", "admission.predictive", {"action": argparse.BooleanOptionalAction,
                                              "help": "refuse starts predicted to push streams to TARGET_FPS"}),
    ("--strategy", "admission.strategy", {"choices": ["round-robin", "least-pipelines", "most-headroom"],
                                          "help": "which worker with room takes a start (default round-robin)"}),
    ("--device-fallback", "admission.fallback", {"metavar": "FROM:TO", "help": "e.g. GPU:CPU when GPUs are full"}),
    ("--mqtt-host", "mqtt.host", {"metavar": "HOST:PORT", "help": "publish worker events to this MQTT broker"}),
    ("--poll-interval", "health.poll_interval", {"type": float, "metavar": "SECONDS"}),
    ("--poll-timeout", "health.poll_timeout", {"type": float, "metavar": "SECONDS"}),
    ("--shutdown-grace", "server.shutdown_grace", {"type": float, "metavar": "SECONDS"}),
    ("--admin-listen", "server.admin_listen", {"metavar": "HOST:PORT", "help": "serve /backends, /metrics here"}),
    ("--admin-token-file", "server.admin_token_file", {"metavar": "PATH", "help": "bearer token for admin routes"}),
    ("--front", "server.front", {"choices": ["fast", "aiohttp"], "help": "API HTTP server (default fast)"}),
    ("--log-level", "log.level", {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]}),
    ("--log-format", "log.format", {"choices": ["text", "json"]}),
]


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML config file")
    parser.add_argument("--kubernetes", action="store_true", help="discover workers by watching pods")
    parser.add_argument("--ha", action="store_true",
                        help="active-passive replicas: only the holder of the Kubernetes Lease serves (docs/ha.md)")
    for flag, dotted, kwargs in SERVE_OPTIONS:
        parser.add_argument(flag, dest=dotted, default=None, **kwargs)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``group.field`` values given on the command line."""
    overrides = {dotted: getattr(args, dotted) for _, dotted, _ in SERVE_OPTIONS}
    if args.kubernetes:
        overrides["discovery.source"] = "kubernetes"
    if args.ha:
        overrides["ha.enabled"] = True
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline-balancer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the balancer")
    _add_serve_options(serve)

    from balancer.sim import cli as sim_cli

    sim_cli.add_parser(sub)

    demo = sub.add_parser("demo", help="simulated workers on loopback plus the balancer on :31000")
    demo.add_argument("--workers", type=int, default=3, metavar="N", help="how many workers (default 3)")
    demo.add_argument("--listen", default="127.0.0.1:31000", metavar="HOST:PORT")
    demo.add_argument("--capacities", default="130,130,700", metavar="FPS,FPS,...",
                      help="capacity fps of each worker, cycled (default 130,130,700)")
    demo.add_argument("--max-running-pipelines", type=int, default=None, metavar="N")
    demo.add_argument("--target-fps", type=float, default=None, metavar="FPS")
    demo.add_argument("--log-format", choices=["text", "json"], default="text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from balancer.config import ConfigError, load_config
        from balancer.server import run_server

        try:
            config = load_config(args.config, os.environ, serve_overrides(args))
        except ConfigError as exc:
            print(f"pipeline-balancer: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
        return run_server(config)
    if args.command == "demo":
        from balancer.demo import run_demo

        return run_demo(args)
    from balancer.sim import cli as sim_cli

    return sim_cli.main(args)
