"""``pipeline-balancer worker``: a simulated Intel DL Streamer Pipeline Server.

Same REST API as the real server; pipelines "run" at a share of a configurable
frame budget (``--capacity-fps``) instead of on a GPU, and publish made-up
detections to MQTT or a file. SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from balancer.config import split_host_port
from balancer.sim.agent import Agent
from balancer.sim.catalog import DEFAULT_MODELS, DEFAULT_PIPELINES, Catalog, CatalogError
from balancer.sim.engine import Engine, EngineSettings
from balancer.sim.ids import InstanceIds, mac_hex, parse_mac, random_mac
from balancer.sim.runner import Runner
from balancer.sim.server import make_app

log = logging.getLogger("balancer.sim")

DESCRIPTION = ("A simulated Intel DL Streamer Pipeline Server: the same REST API, with pipelines that run at "
               "a share of a frame budget (--capacity-fps) and publish made-up detections to MQTT or a file. "
               "Finite source: \"source\": {\"type\": \"uri\", \"uri\": ..., \"properties\": "
               "{\"sim-frames\": N}}. See docs/worker.md.")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="run a simulated Pipeline Server worker", description=DESCRIPTION)
    p.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT",
                   help="REST API address (default 0.0.0.0:8080)")
    p.add_argument("--pipelines-dir", type=Path, default=DEFAULT_PIPELINES, metavar="DIR",
                   help="pipeline definitions, <dir>/<name>/<version>/pipeline.json (default: built in)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, metavar="DIR",
                   help="model descriptions, <dir>/<name>/<version>/model.json (default: built in)")
    p.add_argument("--mac", default=None, help="MAC in instance ids (aa:bb:cc:dd:ee:ff or 12 hex digits); "
                   "default: a random locally administered one")
    p.add_argument("--capacity-fps", type=float, default=130.0, metavar="FPS",
                   help="frames per second the worker processes in total, shared by its running pipelines "
                   "(default 130)")
    p.add_argument("--source-fps", type=float, default=30.0, metavar="FPS",
                   help="frame rate of live sources (gst, webcam, rtsp://), which never run faster (default 30)")
    p.add_argument("--noise", type=float, default=0.02, metavar="FRACTION",
                   help="random rate variation, +/- this fraction; 0 for exact figures (default 0.02)")
    p.add_argument("--max-running-pipelines", type=int, default=None, metavar="N",
                   help="starts beyond N running wait in QUEUED; <= 0 unlimited (env MAX_RUNNING_PIPELINES)")
    p.add_argument("--target-fps", type=float, default=None, metavar="FPS",
                   help="agent answers 0%% when a pipeline runs at or below this (env TARGET_FPS)")
    p.add_argument("--agent-port", type=int, default=None, metavar="PORT",
                   help="serve the seed's HAProxy availability agent on this TCP port")
    p.add_argument("--tick", type=float, default=0.1, metavar="SECONDS",
                   help="how often frames are integrated and published (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for the noise and the default MAC")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


@dataclass(frozen=True)
class WorkerOptions:
    host: str
    port: int
    mac: int
    settings: EngineSettings
    target_fps: float
    agent_port: int | None
    tick: float
    seed: int | None
    catalog: Catalog


def _env_number(name: str, kind: type[int] | type[float]) -> int | float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment {name}={raw!r} is not a number") from None


def options_from(args: argparse.Namespace) -> WorkerOptions:
    """Validate everything before starting; raises ValueError/CatalogError with a readable message."""
    host, port = split_host_port(args.listen)
    rng = random.Random(args.seed) if args.seed is not None else None
    mac = parse_mac(args.mac) if args.mac else random_mac(rng)
    max_running = args.max_running_pipelines
    if max_running is None:
        max_running = int(_env_number("MAX_RUNNING_PIPELINES", int))
    target = args.target_fps if args.target_fps is not None else float(_env_number("TARGET_FPS", float))
    if args.capacity_fps <= 0 or args.source_fps <= 0:
        raise ValueError("--capacity-fps and --source-fps must be > 0")
    if not 0 <= args.noise < 1:
        raise ValueError("--noise must be in [0, 1)")
    if args.tick <= 0:
        raise ValueError("--tick must be > 0")
    if args.agent_port is not None and not 0 < args.agent_port < 65536:
        raise ValueError("--agent-port must be from 1 to 65535")
    settings = EngineSettings(capacity_fps=args.capacity_fps, source_fps=args.source_fps,
                              noise=args.noise, max_running=max_running)
    catalog = Catalog.load(args.pipelines_dir, args.models_dir)
    return WorkerOptions(host, port, mac, settings, target, args.agent_port, args.tick, args.seed, catalog)


def epoch_clock() -> float:
    """Monotonic time expressed as seconds since the epoch: steady rates, real-looking start times."""
    return time.monotonic() + _EPOCH_OFFSET


_EPOCH_OFFSET = time.time() - time.monotonic()


async def serve(opts: WorkerOptions) -> None:
    """Run until SIGTERM/SIGINT, then stop every task and destination."""
    engine = Engine(clock=epoch_clock, ids=InstanceIds(opts.mac), settings=opts.settings,
                    rng=random.Random(opts.seed))
    runner = Runner(engine, opts.catalog, tick=opts.tick)
    web_runner = web.AppRunner(make_app(engine, runner, opts.catalog), access_log=None, handle_signals=False)
    agent = Agent(engine, opts.settings.max_running, opts.target_fps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await web_runner.setup()
    try:
        await web.TCPSite(web_runner, opts.host, opts.port).start()
        if opts.agent_port is not None:
            await agent.start(opts.host, opts.agent_port)
        await runner.start()
        log.info("simulated worker on %s:%d, MAC %s, capacity %.1f fps, max running %d",
                 opts.host, opts.port, mac_hex(opts.mac), opts.settings.capacity_fps, opts.settings.max_running)
        await stop.wait()
        log.info("stopping")
    finally:
        await agent.stop()
        await web_runner.cleanup()
        await runner.stop()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        opts = options_from(args)
    except (ValueError, CatalogError) as exc:
        print(f"pipeline-balancer worker: {exc}", file=sys.stderr)
        return 2
    import uvloop

    try:
        uvloop.run(serve(opts))
    except OSError as exc:
        print(f"pipeline-balancer worker: {exc}", file=sys.stderr)
        return 1
    return 0
