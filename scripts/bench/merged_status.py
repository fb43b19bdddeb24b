"""Merged status: latency of ``GET /pipelines/status`` through the balancer with 1, 10 and 50 workers
of 20 instances each, and the balancer's memory with 100 workers known.

The workers are lightweight fakes (``scripts.bench.fakeworkers``: one process, one
port per worker, fixed answers), not simulated worker processes: 50 Python
worker processes would swamp a 2-core machine and measure themselves. For
reference, the same request straight to one fake worker, and through the seed's
HAProxy set-up (which forwards it to one worker and returns that worker's list only).
Configurations are interleaved (rotated order) ``--reps`` times; medians reported.

    python3 -m scripts.bench.merged_status [--workers 1,10,50] [--connections 1,10] [--duration 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts.bench import common
from scripts.bench.common import REPO, STATUS_PATH, Backend, Child, fmt, median, table

NAME = "merged_status"
TITLE = "Merged status"
INSTANCES = 20
RSS_WORKERS = 100
TARGETS = {"p50_ms_50x20_max": 50.0, "rss_mb_100_workers_max": 80.0,
           "text": "50 workers x 20 instances: p50 <= 50 ms; balancer RSS <= 80 MB with 100 workers known"}
HAPROXY_NOTE = ("The seed's HAProxy has no merged status: it forwards GET /pipelines/status to one worker "
                "(pipeline-server0) and returns that worker's 20 entries only.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.merged_status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, reps=3)
    p.add_argument("--workers", default=None, help="worker counts (default 1,10,50; smoke 1,10)")
    p.add_argument("--connections", default=None, help="wrk connections (default 1,10; smoke 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="whole seconds per wrk run (default 3; quick 2; smoke 1)")
    return p.parse_args(argv)


def start_fakes(count: int) -> tuple[Child, list[int], list[str]]:
    ports_file = common.tmp_dir("fakes") / "ports.json"
    child = common.spawn(common.python_cmd("-m", "scripts.bench.fakeworkers", "--count", str(count), "--instances",
                                           str(INSTANCES), "--ports-file", str(ports_file)), "fakeworkers", cwd=REPO)
    common.wait_until(ports_file.exists, 30, "fake workers listening")
    info = json.loads(ports_file.read_text())
    return child, info["ports"], info["macs"]


def probe(url: str) -> dict[str, Any]:
    status, body = common.http("GET", url + STATUS_PATH)
    entries = json.loads(body) if status == 200 else []
    return {"status": status, "bytes": len(body), "entries": len(entries)}


def measure_rss(ports: list[int], duration: float, smoke: bool) -> dict[str, Any]:
    """A balancer that knows ``len(ports)`` workers: RSS after a few polls, then after merged-status load."""
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    balancer = common.start_balancer(urls, name=f"balancer-{len(urls)}-rss", timeout=60)
    try:
        common.pause(1.0 if smoke else 5.0)
        idle = common.rss_mb(balancer.pid)
        script = common.wrk_script(common.tmp_dir("wrk"), "status-rss")
        load = common.run_wrk(balancer.url + STATUS_PATH, script, 10, duration)
        return {"workers": len(urls), "instances_each": INSTANCES, "rss_mb_after_polls": round(idle, 1),
                "rss_mb_after_load": round(common.rss_mb(balancer.pid), 1),
                "peak_rss_mb": round(common.rss_mb(balancer.pid, "VmHWM"), 1),
                "load": {"rps": load.rps, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.errors},
                "merged": probe(balancer.url)}
    finally:
        balancer.stop()


def summarize(runs: list[dict[str, Any]], configs: list[str], connections: list[int]) -> list[dict[str, Any]]:
    rows = []
    for config in configs:
        for conns in connections:
            mine = [r for r in runs if (r["config"], r["connections"]) == (config, conns)]
            if not mine:
                continue
            rows.append({"config": config, "connections": conns, "runs": len(mine),
                         "workers": mine[0]["workers"], "entries": mine[0]["entries"], "bytes": mine[0]["bytes"],
                         **{k: median([r[k] for r in mine]) for k in ("rps", "p50_ms", "p99_ms")},
                         "cpu_us_per_req": median([r["cpu_us_per_req"] for r in mine])
                         if mine[0]["cpu_us_per_req"] is not None else None,
                         "errors": sum(sum(r["errors"].values()) for r in mine),
                         "p50_each": [r["p50_ms"] for r in mine]})
    return rows


def render(rows: list[dict[str, Any]], rss: dict[str, Any], reps: int, duration: float) -> str:
    body = [[r["config"], str(r["connections"]), str(r["entries"]), fmt(r["bytes"] / 1024, 1), fmt(r["rps"], 0),
             fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2), fmt(r["cpu_us_per_req"], 0), str(r["errors"])] for r in rows]
    lat = table(["config", "conns", "entries returned", "body KB", "req/s", "p50 ms", "p99 ms",
                 "proxy CPU us/req", "errors"], body)
    rss_rows = [[str(rss["workers"]), str(rss["instances_each"]), fmt(rss["rss_mb_after_polls"], 1),
                 fmt(rss["rss_mb_after_load"], 1), fmt(rss["peak_rss_mb"], 1), str(rss["merged"]["entries"]),
                 fmt(rss["load"]["p50_ms"], 1), f"<= {TARGETS['rss_mb_100_workers_max']:g} MB",
                 "yes" if rss["peak_rss_mb"] <= TARGETS["rss_mb_100_workers_max"] else "**no**"]]
    rss_table = table(["workers known", "instances each", "RSS after polls MB", "RSS after load MB", "peak RSS MB",
                       "merged entries", "p50 ms under load (10 conns)", "target", "met"], rss_rows)
    target_rows = [r for r in rows if r["config"] == "balancer-50" and r["connections"] == 1]
    verdict = ""
    if target_rows:
        r = target_rows[0]
        met = r["p50_ms"] <= TARGETS["p50_ms_50x20_max"]
        verdict = (f"\n\nTarget 50 x 20 p50 <= {TARGETS['p50_ms_50x20_max']:g} ms (1 connection): "
                   f"{fmt(r['p50_ms'], 2)} ms, {'met' if met else '**not met**'}.")
    return (f"Fake workers (one process; see scripts/bench/fakeworkers.py) holding {INSTANCES} RUNNING instances "
            f"each; wrk 1 thread, {duration:g} s per run; medians of {reps} interleaved repetitions. balancer-N: "
            f"the balancer in front of N workers (its answer merges N lists: N upstream requests per client "
            f"request). {HAPROXY_NOTE}\n\n{lat}{verdict}\n\nMemory with {rss['workers']} workers known "
            f"(VmRSS of the balancer process; after {rss['workers']} x {INSTANCES} instances were polled, then "
            f"after a wrk run of merged status):\n\n{rss_table}")


def plot(rows: list[dict[str, Any]], connections: list[int], rss: dict[str, Any], path: Any) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    balancers = [r for r in rows if r["config"].startswith("balancer-")]
    for conns in connections:
        mine = sorted((r for r in balancers if r["connections"] == conns), key=lambda r: r["workers"])
        xs = [r["workers"] for r in mine]
        axes[0].plot(xs, [r["p50_ms"] for r in mine], marker="o", label=f"p50, {conns} conn")
        axes[0].plot(xs, [r["p99_ms"] for r in mine], marker="x", linestyle="--", label=f"p99, {conns} conn")
    axes[0].axhline(TARGETS["p50_ms_50x20_max"], color="k", linestyle=":", label="p50 target (50 workers)")
    axes[0].set_xlabel("workers (20 instances each)")
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_title("Merged GET /pipelines/status through the balancer")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    labels = ["after polls", "after load", "peak"]
    values = [rss["rss_mb_after_polls"], rss["rss_mb_after_load"], rss["peak_rss_mb"]]
    axes[1].bar(labels, values)
    axes[1].axhline(TARGETS["rss_mb_100_workers_max"], color="k", linestyle=":", label="target 80 MB")
    axes[1].set_ylabel("MB")
    axes[1].set_title(f"Balancer RSS with {rss['workers']} workers known")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    common.use_source(args.src)
    common.require_tools("wrk", "haproxy")
    reps = args.reps or (1 if args.smoke or args.quick else 3)
    counts = [int(n) for n in (args.workers or ("1,10" if args.smoke else "1,10,50")).split(",")]
    connections = [int(c) for c in (args.connections or ("1" if args.smoke else "1,10")).split(",")]
    duration = float(max(1, round(args.duration or (1 if args.smoke else 2 if args.quick else 3))))
    paths = common.results_paths(NAME, args)
    params = {"reps": reps, "workers": counts, "instances_each": INSTANCES, "connections": connections,
              "duration_s": duration, "rss_workers": RSS_WORKERS, "fake_workers": "scripts.bench.fakeworkers",
              "smoke": args.smoke, "quick": args.quick}
    doc = common.document(NAME, TITLE, params, started)
    print(f"{TITLE}: {params}")

    fakes, ports, macs = start_fakes(max(RSS_WORKERS, *counts))
    targets: dict[str, tuple[str, Child | None, int]] = {"direct (1 worker)": (f"http://127.0.0.1:{ports[0]}",
                                                                               None, 1)}
    top = max(counts)
    haproxy = common.start_haproxy([Backend(f"w{i}", "127.0.0.1", p, m) for i, (p, m)
                                    in enumerate(zip(ports[:top], macs[:top], strict=True))])
    targets[f"haproxy ({top} workers, 1 list)"] = (haproxy.url, haproxy, top)
    for n in counts:
        b = common.start_balancer([f"http://127.0.0.1:{p}" for p in ports[:n]], name=f"balancer-{n}",
                                  wait_ready=False)
        targets[f"balancer-{n}"] = (b.url, b, n)
    for _, proc, _ in targets.values():
        if proc is not None and proc.name.startswith("balancer"):
            common.wait_balancer(proc, 60)
    shapes = {name: probe(url) for name, (url, _, _) in targets.items()}
    script = common.wrk_script(common.tmp_dir("wrk"), "status")
    configs = list(targets)
    if not args.smoke:
        for name in configs:
            common.run_wrk(targets[name][0] + STATUS_PATH, script, 4, 1)
    runs = []
    for rep in range(reps):
        for conns in connections:
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for name in order:
                url, proc, n = targets[name]
                cpu0 = common.cpu_seconds(proc.pid) if proc else 0.0
                result = common.run_wrk(url + STATUS_PATH, script, conns, duration)
                cpu = common.cpu_seconds(proc.pid) - cpu0 if proc else None
                run = {**result.to_dict(), "config": name, "connections": conns, "rep": rep, "workers": n,
                       **shapes[name], "cpu_us_per_req":
                           None if cpu is None or not result.requests else round(1e6 * cpu / result.requests, 1)}
                runs.append(run)
                print(f"rep {rep} c={conns:<3} {name:28} {result.rps:>8.0f} req/s  p50 {result.p50_ms:.2f} ms  "
                      f"p99 {result.p99_ms:.2f} ms  {shapes[name]['entries']} entries", flush=True)
    for _, proc, _ in targets.values():
        if proc is not None:
            proc.stop()
    rss = measure_rss(ports[:RSS_WORKERS], duration, args.smoke)
    fakes.stop()
    print(f"RSS with {RSS_WORKERS} workers: {rss}")
    rows = summarize(runs, configs, connections)
    markdown = render(rows, rss, reps, duration)
    print("\n" + markdown)
    doc.update(configs=configs, runs=runs, summary=rows, rss=rss, targets=TARGETS, notes=[HAPROXY_NOTE])
    plot(rows, connections, rss, paths[1])
    common.write_results(doc, paths, markdown, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bound = args.max_seconds or (60 if args.smoke else 600)
    return common.run_main(lambda: bench(args), bound)


if __name__ == "__main__":
    sys.exit(main())
