#!/usr/bin/env python3
"""Soak test (not part of CI's default run): the real balancer in front of simulated workers, under a steady mix
of starts, status polls and deletes, with a worker killed (SIGKILL) and restarted every ``--kill-every`` seconds.

    python3 scripts/soak.py --minutes 10          # the issue's run: 8 workers, 20 requests/s, a kill a minute

Pass criteria (exit status 0 only if all hold): no request lost (connection error) or hung (no answer within
``--client-timeout``), no 500, no reservation left once quiet, and the balancer's RSS after the warm-up minute
grows less than ``--rss-growth-mb``. Every process it starts is on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

START_PATH = "/pipelines/object_detection/person_vehicle_bike"
BODY = {"source": {"uri": "file:///videos/cars.mp4", "type": "uri"}, "parameters": {"detection-device": "CPU"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Procs:
    def __init__(self) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="soak-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "balancer", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def wait_http(session: aiohttp.ClientSession, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)):
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    procs = Procs()
    ports = [free_port() for _ in range(args.workers)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    lb_port = free_port()
    lb_url = f"http://127.0.0.1:{lb_port}"
    results: Counter[str] = Counter()
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    live: list[str] = []
    kills = 0
    worst = 0.0
    try:
        for n, port in enumerate(ports):
            procs.start(f"worker{n}", "worker", "--listen", f"127.0.0.1:{port}", "--capacity-fps", "400",
                        "--seed", str(n))
        lb = procs.start("balancer", "serve", "--listen", f"127.0.0.1:{lb_port}", "--workers", ",".join(urls),
                         env={"MAX_RUNNING_PIPELINES": str(args.max_running), "UPSTREAM_TIMEOUT": "10",
                              "LOG_LEVEL": "WARNING"})
        timeout = aiohttp.ClientTimeout(total=args.client_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for url in [*urls, lb_url]:
                await wait_http(session, url + ("/healthz" if url == lb_url else "/pipelines"))
            began = time.monotonic()
            end = began + args.minutes * 60
            next_kill = began + args.kill_every
            next_rss = began
            in_flight: set[asyncio.Task[None]] = set()

            async def one(op: str) -> None:
                nonlocal worst
                method, path, body = "GET", "/pipelines/status", None
                if op == "start":
                    method, path, body = "POST", START_PATH, BODY
                elif op == "status_one" and live:
                    path = f"/pipelines/status/{rng.choice(live)}"
                elif op == "delete" and live:
                    instance = live.pop(rng.randrange(len(live)))
                    method, path = "DELETE", f"/pipelines/{instance}"
                t0 = time.monotonic()
                try:
                    async with session.request(method, lb_url + path, json=body) as resp:
                        payload = await resp.read()
                        results[f"{op} {resp.status}"] += 1
                        if op == "start" and resp.status == 200:
                            live.append(json.loads(payload))
                except TimeoutError:
                    results[f"{op} HUNG"] += 1
                except (aiohttp.ClientError, OSError) as exc:
                    results[f"{op} LOST {type(exc).__name__}"] += 1
                took = time.monotonic() - t0
                latencies.append(took)
                worst = max(worst, took)

            tick = 1.0 / args.rate
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_rss:
                    rss.append((round(now - began, 1), round(rss_mb(lb.pid), 1)))
                    next_rss += 10
                if now >= next_kill:
                    victim = rng.randrange(args.workers)
                    procs.kill(f"worker{victim}")
                    kills += 1
                    print(f"[{now - began:6.0f}s] killed worker{victim}; restart in {args.down:g}s", flush=True)

                    async def restart(n: int = victim, seed: int = victim + 100 * kills) -> None:
                        await asyncio.sleep(args.down)
                        procs.start(f"worker{n}", "worker", "--listen", f"127.0.0.1:{ports[n]}", "--capacity-fps",
                                    "400", "--seed", str(seed))

                    task = asyncio.create_task(restart())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    next_kill += args.kill_every
                r = rng.random()
                op = ("start" if len(live) < args.max_live else "delete") if r < 0.3 else (
                    "status_all" if r < 0.55 else "status_one" if r < 0.8 else "delete")
                task = asyncio.create_task(one(op))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(tick)
            await asyncio.gather(*in_flight)
            elapsed = time.monotonic() - began
            # quiet: every worker back and polled, then no reservation may be left
            await asyncio.sleep(args.quiet)
            async with session.get(lb_url + "/backends") as resp:
                backends = await resp.json()
            rss.append((round(time.monotonic() - began, 1), round(rss_mb(lb.pid), 1)))
        reserved = sum(w["reserved"] for w in backends["workers"])
        states = Counter(w["state"] for w in backends["workers"])
        listed = sum(w.get("instances_listed", 0) for w in backends["workers"])
        known = backends.get("instances_known")
    finally:
        procs.stop_all()
    total = sum(results.values())
    lost = sum(v for k, v in results.items() if "LOST" in k)
    hung = sum(v for k, v in results.items() if "HUNG" in k)
    server_errors = sum(v for k, v in results.items() if k.endswith(" 500"))
    after_warmup = [m for t, m in rss if t >= 60] or [m for _, m in rss]
    latencies.sort()
    summary = {
        "minutes": round(elapsed / 60, 2), "workers": args.workers, "rate": args.rate, "kills": kills,
        "requests": total, "lost": lost, "hung": hung, "http_500": server_errors,
        "by_outcome": dict(sorted(results.items())),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
        "latency_max_ms": round(worst * 1000, 1),
        "rss_mb": {"first": rss[0][1], "after_warmup": after_warmup[0], "end": rss[-1][1],
                   "max": max(m for _, m in rss)},
        "rss_samples": rss,
        "reserved_when_quiet": reserved, "worker_states_when_quiet": dict(states),
        "instances_listed_by_workers": listed, "instances_known_to_balancer": known,
        "logs": str(procs.logdir),
    }
    growth = summary["rss_mb"]["end"] - summary["rss_mb"]["after_warmup"]  # type: ignore[index]
    summary["ok"] = lost == 0 and hung == 0 and server_errors == 0 and reserved == 0 and growth < args.rss_growth_mb
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--workers", type=int, default=8, help="simulated workers (default 8)")
    parser.add_argument("--rate", type=float, default=20.0, help="client requests per second (default 20)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills (default 60)")
    parser.add_argument("--down", type=float, default=5.0, help="seconds a killed worker stays down (default 5)")
    parser.add_argument("--max-running", type=int, default=4, help="MAX_RUNNING_PIPELINES (default 4)")
    parser.add_argument("--max-live", type=int, default=24, help="pipelines kept running at most (default 24)")
    parser.add_argument("--client-timeout", type=float, default=30.0, help="a request without answer by then is hung")
    parser.add_argument("--quiet", type=float, default=20.0, help="seconds of quiet before the final check")
    parser.add_argument("--rss-growth-mb", type=float, default=20.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    summary = asyncio.run(soak(args))
    samples = summary.pop("rss_samples")
    print(json.dumps(summary, indent=1))
    print("rss samples (s, MB):", " ".join(f"{t:g}:{m:g}" for t, m in samples))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
