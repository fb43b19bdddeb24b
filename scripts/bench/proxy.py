"""Proxy overhead: wrk against one worker directly, the seed's HAProxy, and the balancer.

The workers are 4 fast nginx stubs (fixed answers), so the proxy is the
bottleneck. For each request (a ~300-byte JSON start ``POST`` and
``GET /pipelines/status``) and each connection count, the configurations run
one after another, in a rotated order, ``--reps`` times; medians and per-pair
ratios (balancer / HAProxy within one repetition) are reported.

    python3 -m scripts.bench.proxy [--duration 3] [--reps 3] [--connections 1,32,128] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts.bench import common
from scripts.bench.common import (
    START_PATH,
    STATUS_PATH,
    Backend,
    Child,
    cpu_seconds,
    fmt,
    median,
    ratio,
    rss_mb,
    run_wrk,
    table,
    wrk_script,
)
from scripts.bench.stubs import start_stubs

NAME = "proxy"
TITLE = "Proxy overhead"
STUBS = 4
START_BODY = (
    '{"source": {"uri": "file:///home/pipeline-server/samples/video/person-bicycle-car-detection.mp4", '
    '"type": "uri"}, "destination": {"metadata": {"type": "mqtt", "host": "127.0.0.1:1883", '
    '"topic": "vaserving", "timeout": 1000}}, "parameters": {"detection-device": "CPU", '
    '"detection-model-instance-id": "inf0"}, "tags": {"camera": "bench-01"}}'
)
REQUESTS = {"post": ("POST", START_PATH), "status": ("GET", STATUS_PATH)}
STATUS_NOTE = ("† GET /pipelines/status: the balancer merges all 4 workers' lists (4 upstream requests per "
               "client request); the seed's HAProxy forwards it to one worker (pipeline-server0) and returns "
               "that worker's list only.")
LABELS = {"post": "POST start", "status": "GET status†"}
TARGETS = {
    "rps_ratio_min": 0.8,
    "p99_ratio_max": 1.5,
    "added_p50_ratio_max": 1.2,
    "text": "at 32 and 128 connections balancer req/s >= 0.8x HAProxy's and p99 <= 1.5x HAProxy's; "
            "at 1 connection the p50 the balancer adds over direct <= 1.2x what HAProxy adds",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, reps=3)
    p.add_argument("--duration", type=float, default=None,
                   help="whole seconds per wrk run (default 3; quick 2; smoke 1)")
    p.add_argument("--connections", default=None, help="comma-separated connection counts (default 1,32,128)")
    p.add_argument("--fronts", default=None,
                   help="balancer front ends to include, comma-separated (default: every choice of "
                        "'serve --front', or the only front when the option does not exist)")
    return p.parse_args(argv)


def start_targets(fronts: list[str]) -> tuple[dict[str, Child], Child, dict[str, str]]:
    """nginx stubs, HAProxy and one balancer per front: {config: process whose CPU counts}, nginx, {config: url}."""
    nginx, stubs = start_stubs(STUBS)
    haproxy = common.start_haproxy([Backend(f"w{i}", "127.0.0.1", s.port, s.mac) for i, s in enumerate(stubs)])
    procs: dict[str, Child] = {"haproxy": haproxy}
    urls = {"direct": stubs[0].url, "haproxy": haproxy.url}
    for front in fronts or [""]:
        name = f"balancer-{front}" if front else "balancer"
        args = ["--front", front] if front else []
        procs[name] = common.start_balancer([s.url for s in stubs], args=args, name=name, wait_ready=False)
        urls[name] = procs[name].url
    for name, proc in procs.items():
        if name.startswith("balancer"):
            common.wait_balancer(proc)
    return procs, nginx, urls


def one_run(config: str, url: str, proc: Child | None, nginx: Child, script: Any, connections: int,
            duration: float) -> dict[str, Any]:
    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
    stub0 = cpu_seconds(nginx.pid)
    result = run_wrk(url, script, connections, duration)
    cpu = cpu_seconds(proc.pid) - cpu0 if proc else None
    return {
        **result.to_dict(),
        "proxy_cpu_s": None if cpu is None else round(cpu, 3),
        "proxy_cpu_pct": None if cpu is None else round(100 * cpu / result.duration_s, 1),
        "proxy_cpu_us_per_req": None if cpu is None or not result.requests else round(1e6 * cpu / result.requests, 1),
        "proxy_rss_mb": round(rss_mb(proc.pid), 1) if proc else None,
        "stub_cpu_s": round(cpu_seconds(nginx.pid) - stub0, 3),
    }


def summarize(runs: list[dict[str, Any]], configs: list[str], connections: list[int]) -> dict[str, Any]:
    cells = []
    for request in REQUESTS:
        for conns in connections:
            for config in configs:
                mine = [r for r in runs if (r["request"], r["connections"], r["config"]) == (request, conns, config)]
                if not mine:
                    continue
                cells.append({
                    "request": request, "connections": conns, "config": config, "runs": len(mine),
                    "rps": median([r["rps"] for r in mine]),
                    "p50_ms": median([r["p50_ms"] for r in mine]),
                    "p99_ms": median([r["p99_ms"] for r in mine]),
                    "proxy_cpu_pct": None if config == "direct" else median([r["proxy_cpu_pct"] for r in mine]),
                    "proxy_cpu_us_per_req":
                        None if config == "direct" else median([r["proxy_cpu_us_per_req"] for r in mine]),
                    "proxy_rss_mb": None if config == "direct" else max(r["proxy_rss_mb"] for r in mine),
                    "errors": sum(sum(r["errors"].values()) for r in mine),
                })
    ratios = []
    balancers = [c for c in configs if c.startswith("balancer")]
    index = {(r["request"], r["connections"], r["config"], r["rep"]): r for r in runs}
    for request in REQUESTS:
        for conns in connections:
            for config in balancers:
                per_rep = []
                for rep in sorted({r["rep"] for r in runs}):
                    b, h, d = (index.get((request, conns, name, rep)) for name in (config, "haproxy", "direct"))
                    if b is None or h is None:
                        continue
                    added = None
                    if d is not None:
                        added = ratio(b["p50_ms"] - d["p50_ms"], h["p50_ms"] - d["p50_ms"])
                    per_rep.append({"rep": rep, "rps": ratio(b["rps"], h["rps"]),
                                    "p50": ratio(b["p50_ms"], h["p50_ms"]), "p99": ratio(b["p99_ms"], h["p99_ms"]),
                                    "added_p50": added})
                if not per_rep:
                    continue
                row: dict[str, Any] = {"request": request, "connections": conns, "config": config,
                                       "per_rep": per_rep}
                for key in ("rps", "p50", "p99", "added_p50"):
                    values = [p[key] for p in per_rep if p[key] is not None]
                    row[key] = median(values)
                    row[f"{key}_min"] = min(values) if values else None
                    row[f"{key}_max"] = max(values) if values else None
                if conns == 1:
                    row["target"] = f"added p50 <= {TARGETS['added_p50_ratio_max']}x"
                    row["met"] = row["added_p50"] <= TARGETS["added_p50_ratio_max"]
                else:
                    row["target"] = f"req/s >= {TARGETS['rps_ratio_min']}x, p99 <= {TARGETS['p99_ratio_max']}x"
                    row["met"] = row["rps"] >= TARGETS["rps_ratio_min"] and row["p99"] <= TARGETS["p99_ratio_max"]
                ratios.append(row)
    return {"cells": cells, "ratios": ratios}


def render(summary: dict[str, Any], reps: int, duration: float) -> str:
    rows = [[LABELS[c["request"]], str(c["connections"]), c["config"], fmt(c["rps"], 0), fmt(c["p50_ms"], 3),
             fmt(c["p99_ms"], 3), fmt(c["proxy_cpu_pct"], 0), fmt(c["proxy_cpu_us_per_req"], 0),
             fmt(c["proxy_rss_mb"], 1), str(c["errors"])] for c in summary["cells"]]
    figures = table(["request", "conns", "config", "req/s", "p50 ms", "p99 ms", "proxy CPU %", "CPU us/req",
                     "RSS MB", "errors"], rows)

    def span(r: dict[str, Any], key: str) -> str:
        if r[key] is None or r[f"{key}_min"] is None:
            return "-"
        return f"{fmt(r[key])} ({fmt(r[f'{key}_min'])}-{fmt(r[f'{key}_max'])})"

    ratio_rows = [[LABELS[r["request"]], str(r["connections"]), r["config"], span(r, "rps"), span(r, "p50"),
                   span(r, "p99"), span(r, "added_p50") if r["connections"] == 1 else "-", r["target"],
                   "yes" if r["met"] else "**no**"] for r in summary["ratios"]]
    ratios = table(["request", "conns", "balancer", "req/s ratio", "p50 ratio", "p99 ratio", "added-p50 ratio",
                    "target", "met"], ratio_rows)
    return (f"Medians of {reps} interleaved repetitions, {duration:g} s of wrk each (1 thread). "
            f"Proxy CPU % is of one core, over the wrk run.\n\n{figures}\n\n{STATUS_NOTE}\n\n"
            f"Ratios balancer / HAProxy within each repetition: median (min-max). Added-p50 ratio = "
            f"(balancer p50 - direct p50) / (HAProxy p50 - direct p50).\n\n{ratios}")


def plot(summary: dict[str, Any], configs: list[str], connections: list[int], path: Any) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / max(1, len(configs))
    for row, request in enumerate(REQUESTS):
        for col, (key, label) in enumerate((("rps", "requests/s"), ("p99_ms", "p99 latency (ms)"))):
            ax = axes[row][col]
            for i, config in enumerate(configs):
                values = []
                for conns in connections:
                    cell = next((c for c in summary["cells"] if (c["request"], c["connections"], c["config"])
                                 == (request, conns, config)), None)
                    values.append(cell[key] if cell else 0)
                xs = [x + i * width for x in range(len(connections))]
                ax.bar(xs, values, width, label=config)
            ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(connections))])
            ax.set_xticklabels([f"{c} conn" for c in connections])
            ax.set_yscale("log")
            ax.set_title(f"{'POST start' if request == 'post' else 'GET /pipelines/status'}: {label}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Proxy overhead over 4 nginx stub workers (medians; log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    common.use_source(args.src)
    common.require_tools("wrk", "haproxy", "nginx")
    reps = args.reps or (1 if args.smoke or args.quick else 3)
    duration = float(max(1, round(args.duration or (1 if args.smoke else 2 if args.quick else 3))))
    connections = [int(c) for c in (args.connections or ("32" if args.smoke else "1,32,128")).split(",")]
    fronts = args.fronts.split(",") if args.fronts else common.balancer_fronts()
    paths = common.results_paths(NAME, args)
    params = {"reps": reps, "duration_s": duration, "connections": connections, "fronts": fronts or ["(only one)"],
              "stub_workers": STUBS, "post_body_bytes": len(START_BODY), "wrk_threads": 1,
              "smoke": args.smoke, "quick": args.quick}
    doc = common.document(NAME, TITLE, params, started)
    print(f"{TITLE}: {params}")

    procs, nginx, urls = start_targets(fronts)
    configs = list(urls)
    scripts_dir = common.tmp_dir("wrk")
    scripts = {"post": wrk_script(scripts_dir, "post", "POST", START_BODY.encode()),
               "status": wrk_script(scripts_dir, "status", "GET")}
    for config in configs if not args.smoke else []:  # warm-up: connections, caches, the first polls
        for request, (_, path) in REQUESTS.items():
            run_wrk(urls[config] + path, scripts[request], 8, 1)
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        for conns in connections:
            for request, (_, path) in REQUESTS.items():
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]
                for config in order:
                    run = one_run(config, urls[config] + path, procs.get(config), nginx, scripts[request], conns,
                                  duration)
                    run.update(config=config, request=request, connections=conns, rep=rep)
                    runs.append(run)
                    print(f"rep {rep} {request:6} c={conns:<3} {config:16} {run['rps']:>9.0f} req/s  "
                          f"p50 {run['p50_ms']:.3f} ms  p99 {run['p99_ms']:.3f} ms  "
                          f"cpu {fmt(run['proxy_cpu_pct'], 0)}%  errors {sum(run['errors'].values())}", flush=True)
    summary = summarize(runs, configs, connections)
    markdown = render(summary, reps, duration)
    print("\n" + markdown)
    doc.update(configs=configs, runs=runs, summary=summary, targets=TARGETS, notes=[STATUS_NOTE])
    plot(summary, configs, connections, paths[1])
    common.write_results(doc, paths, markdown, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bound = args.max_seconds or (60 if args.smoke else 900)
    return common.run_main(lambda: bench(args), bound)


if __name__ == "__main__":
    sys.exit(main())
