"""Burst admission: N concurrent starts against 4 simulated workers with MAX_RUNNING_PIPELINES=5.

Two configurations, each with fresh workers for every burst:
- ``haproxy``: the seed's set-up (``balance roundrobin``, ``agent-check agent-inter 1s`` on each
  worker's availability agent, which answers by the seed's rule with MAX_RUNNING_PIPELINES=5);
- ``balancer``: ``pipeline-balancer serve`` with MAX_RUNNING_PIPELINES=5.
Admitted and rejected come from the client's answers; overshoot (active pipelines beyond
MAX on a worker, RUNNING + QUEUED: the worker queues what it cannot run) from each
worker's own ``GET /pipelines/status``.

    python3 -m scripts.bench.burst [--bursts 10,20,40,80] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp

from scripts.bench import common
from scripts.bench.common import START_PATH, STATUS_PATH, Child, fmt, median, table

NAME = "burst"
TITLE = "Burst admission"
WORKERS = 4
MAX_RUNNING = 5
CAPACITY_FPS = 1000.0
"""High enough that fps never limits admission here: this benchmark is about the count rule."""
START_BODY = {"source": {"uri": "file:///home/pipeline-server/samples/video/person-bicycle-car-detection.mp4",
                         "type": "uri"}, "parameters": {"detection-device": "CPU"}}
CONFIGS = ("haproxy", "balancer")
TARGETS = {"overshoot": 0, "admitted": "= free slots exactly (min(burst, 4 x 5))",
           "text": "overshoot 0 and admitted = free slots exactly"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, reps=3)
    p.add_argument("--bursts", default=None, help="comma-separated burst sizes (default 10,20,40,80; smoke 40)")
    return p.parse_args(argv)


async def fire(url: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """``count`` start requests sent at the same moment, each on its own connection."""
    body = json.dumps(START_BODY).encode()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        go = asyncio.Event()

        async def one() -> dict[str, Any]:
            await go.wait()
            started = time.perf_counter()
            try:
                async with session.post(url + START_PATH, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    text = await resp.text()
                    return {"status": resp.status, "ms": 1000 * (time.perf_counter() - started), "body": text[:300]}
            except (aiohttp.ClientError, TimeoutError) as exc:
                return {"status": 0, "ms": 1000 * (time.perf_counter() - started), "body": repr(exc)[:300]}

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(0.05)
        go.set()
        return list(await asyncio.gather(*tasks))


def start_workers(run: int) -> list[Child]:
    workers = [common.start_sim_worker(CAPACITY_FPS, common.bench_mac(i, run), max_running=MAX_RUNNING, agent=True,
                                       name=f"worker{i}") for i in range(WORKERS)]
    common.wait_workers(workers)
    return workers


def worker_counts(workers: list[Child]) -> list[dict[str, int]]:
    counts = []
    for w in workers:
        states = Counter(e["state"] for e in common.get_json(w.url + STATUS_PATH))
        counts.append({"running": states["RUNNING"], "queued": states["QUEUED"], "listed": sum(states.values())})
    return counts


def one_run(config: str, burst: int, run: int) -> dict[str, Any]:
    workers = start_workers(run)
    front: Child | None = None
    try:
        if config == "haproxy":
            front = common.start_haproxy(common.backends_of(workers))
            common.wait_haproxy_agents(front, WORKERS)
        else:
            front = common.start_balancer([w.url for w in workers], env={"MAX_RUNNING_PIPELINES": str(MAX_RUNNING)})
        began = time.perf_counter()
        answers = asyncio.run(fire(front.url, burst))
        burst_s = time.perf_counter() - began
        time.sleep(0.3)
        counts = worker_counts(workers)
    finally:
        common.stop_all([*workers, *([front] if front else [])])
    codes = Counter(a["status"] for a in answers)
    active = [c["running"] + c["queued"] for c in counts]
    admitted = codes.get(200, 0)
    free = WORKERS * MAX_RUNNING
    result = {
        "config": config, "burst": burst, "free_slots": free, "expected_admitted": min(burst, free),
        "admitted": admitted, "rejected": codes.get(503, 0),
        "other": {str(k): v for k, v in codes.items() if k not in (200, 503)},
        "overshoot": sum(max(0, a - MAX_RUNNING) for a in active),
        "max_active_per_worker": max(active), "queued": sum(c["queued"] for c in counts),
        "listed_on_workers": sum(c["listed"] for c in counts), "per_worker": counts,
        "burst_s": round(burst_s, 3),
        "p50_ms": round(median([a["ms"] for a in answers]), 1),
        "max_ms": round(max(a["ms"] for a in answers), 1),
        "sample_refusal": next((a["body"] for a in answers if a["status"] != 200), None),
    }
    result["exact"] = result["admitted"] == result["expected_admitted"] and result["overshoot"] == 0
    return result


def summarize(runs: list[dict[str, Any]], bursts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for burst in bursts:
        for config in CONFIGS:
            mine = [r for r in runs if (r["burst"], r["config"]) == (burst, config)]
            if not mine:
                continue
            rows.append({
                "burst": burst, "config": config, "runs": len(mine), "free_slots": mine[0]["free_slots"],
                "expected_admitted": mine[0]["expected_admitted"],
                **{k: median([r[k] for r in mine]) for k in ("admitted", "rejected", "overshoot",
                                                               "max_active_per_worker", "queued", "p50_ms")},
                "each": {k: [r[k] for r in mine] for k in ("admitted", "rejected", "overshoot")},
                "exact_runs": sum(1 for r in mine if r["exact"]),
            })
    return rows


def render(rows: list[dict[str, Any]], reps: int) -> str:
    def each(r: dict[str, Any], key: str) -> str:
        values = r["each"][key]
        return fmt(r[key], 0) if len(set(values)) == 1 else f"{fmt(r[key], 0)} ({','.join(map(str, values))})"

    body = [[str(r["burst"]), r["config"], str(r["expected_admitted"]), each(r, "admitted"), each(r, "rejected"),
             each(r, "overshoot"), fmt(r["max_active_per_worker"], 0), fmt(r["queued"], 0), fmt(r["p50_ms"], 0),
             f"{r['exact_runs']}/{r['runs']}"] for r in rows]
    return (f"4 simulated workers, MAX_RUNNING_PIPELINES=5 (20 free slots), fresh workers for every burst; "
            f"medians of {reps} interleaved repetitions (each repetition's value in brackets when they differ). "
            f"Overshoot = active pipelines (RUNNING + QUEUED) beyond 5 on a worker, summed over workers, "
            f"read from the workers' own status lists.\n\n"
            + table(["burst", "config", "free slots -> expected", "admitted", "rejected", "overshoot",
                     "max active on a worker", "queued on workers", "client p50 ms", "exact runs"], body))


def plot(rows: list[dict[str, Any]], bursts: list[int], path: Any) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for ax, key, title in ((axes[0], "admitted", "admitted (line: free slots)"),
                           (axes[1], "overshoot", "overshoot (pipelines beyond MAX)")):
        for i, config in enumerate(CONFIGS):
            values = [next((r[key] for r in rows if (r["burst"], r["config"]) == (b, config)), 0) for b in bursts]
            ax.bar([x + i * width for x in range(len(bursts))], values, width, label=config)
        if key == "admitted":
            ax.plot([x + width / 2 for x in range(len(bursts))], [min(b, WORKERS * MAX_RUNNING) for b in bursts],
                    "k--", marker="o", label="free slots")
        ax.set_xticks([x + width / 2 for x in range(len(bursts))])
        ax.set_xticklabels([f"burst {b}" for b in bursts])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle("Burst admission: 4 workers x MAX_RUNNING_PIPELINES=5 (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    common.use_source(args.src)
    common.require_tools("haproxy")
    reps = args.reps or (1 if args.smoke or args.quick else 3)
    bursts = [int(b) for b in (args.bursts or ("40" if args.smoke else "10,20,40,80")).split(",")]
    paths = common.results_paths(NAME, args)
    params = {"reps": reps, "bursts": bursts, "workers": WORKERS, "max_running_pipelines": MAX_RUNNING,
              "worker_capacity_fps": CAPACITY_FPS, "target_fps": 0, "agent_inter_s": 1,
              "smoke": args.smoke, "quick": args.quick}
    doc = common.document(NAME, TITLE, params, started)
    print(f"{TITLE}: {params}")
    runs = []
    run_id = 0
    for rep in range(reps):
        for burst in bursts:
            for config in CONFIGS if (rep + burst) % 2 == 0 else CONFIGS[::-1]:
                run_id += 1
                result = one_run(config, burst, run_id)
                result["rep"] = rep
                runs.append(result)
                print(f"rep {rep} burst {burst:3} {config:9} admitted {result['admitted']:3} rejected "
                      f"{result['rejected']:3} overshoot {result['overshoot']:3} max active "
                      f"{result['max_active_per_worker']} other {result['other']}", flush=True)
    rows = summarize(runs, bursts)
    markdown = render(rows, reps)
    print("\n" + markdown)
    doc.update(configs=list(CONFIGS), runs=runs, summary=rows, targets=TARGETS)
    plot(rows, bursts, paths[1])
    common.write_results(doc, paths, markdown, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bound = args.max_seconds or (60 if args.smoke else 900)
    return common.run_main(lambda: bench(args), bound)


if __name__ == "__main__":
    sys.exit(main())
