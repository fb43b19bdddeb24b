"""``pipeline-balancer demo``: simulated workers on loopback and the balancer in front of them.

Each worker is a real ``pipeline-balancer worker`` process (kill one to watch the
balancer route around it); the balancer runs in this process on ``--listen``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import uvloop

from balancer.config import ConfigError, load_config, split_host_port
from balancer.logs import setup_logging
from balancer.server import serve

START_BODY = (
    '{"source": {"uri": "https://github.com/intel-iot-devkit/sample-videos/raw/master/'
    'person-bicycle-car-detection.mp4", "type": "uri"}, "parameters": {"detection-device": "CPU"}}'
)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/pipelines", timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"worker {url} did not start within {timeout:.0f}s")


Workers = list[tuple[str, "subprocess.Popen[bytes]"]]


def start_workers(count: int, capacities: list[float], host: str = "127.0.0.1") -> Workers:
    workers = []
    for i in range(count):
        port = _free_port(host)
        url = f"http://{host}:{port}"
        capacity = capacities[i % len(capacities)]
        cmd = [sys.executable, "-m", "balancer", "worker", "--listen", f"{host}:{port}",
               "--capacity-fps", f"{capacity:g}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers.append((url, proc))
    for url, proc in workers:
        _wait_ready(url, proc)
    return workers


def _print_banner(listen: str, workers: Workers, capacities: list[float]) -> None:
    host, port = split_host_port(listen)
    base = f"http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}"
    lines = [f"pipeline-balancer demo: balancer on {base}, {len(workers)} simulated workers:"]
    for i, (url, proc) in enumerate(workers):
        lines.append(f"  {url}  capacity {capacities[i % len(capacities)]:g} fps  pid {proc.pid}")
    lines += [
        "",
        "Try:",
        f"  curl {base}/pipelines/object_detection/person_vehicle_bike -X POST \\",
        f"       -H 'Content-Type: application/json' -d '{START_BODY}'",
        f"  curl {base}/pipelines/status",
        f"  curl {base}/pipelines/status/<instance id>",
        f"  curl -X DELETE {base}/pipelines/object_detection/person_vehicle_bike/<instance id>",
        f"  curl {base}/backends",
        f"  curl {base}/metrics",
        "Ctrl-C stops the balancer and the workers.",
        "",
    ]
    print("\n".join(lines), flush=True)


def run_demo(args: argparse.Namespace) -> int:
    setup_logging("INFO", args.log_format)
    capacities = [float(c) for c in args.capacities.split(",") if c.strip()]
    if args.workers < 1 or not capacities:
        print("pipeline-balancer demo: need at least one worker and one capacity", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.max_running_pipelines is not None:
        env["MAX_RUNNING_PIPELINES"] = str(args.max_running_pipelines)
    if args.target_fps is not None:
        env["TARGET_FPS"] = str(args.target_fps)
    workers = start_workers(args.workers, capacities)
    try:
        env["WORKERS"] = ",".join(url for url, _ in workers)
        try:
            config = load_config(None, env, {"server.listen": args.listen, "log.format": args.log_format})
        except ConfigError as exc:
            print(f"pipeline-balancer demo: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
        _print_banner(args.listen, workers, capacities)
        with contextlib.suppress(KeyboardInterrupt):
            return uvloop.run(serve(config))
        return 0
    finally:
        for _, proc in workers:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for _, proc in workers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

