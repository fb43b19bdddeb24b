"""Stream density: how many file-source streams a heterogeneous cluster takes, and how many then run too slow.

Simulated workers like the seed's examples (capacities 130, 130 and 700 fps,
TARGET_FPS=30, no MAX_RUNNING_PIPELINES). Starts go one after another, one every
``--interval`` seconds, until the cluster refuses ``--refusals`` times in a row;
then the streams run ``--hold`` seconds and each worker's own status list gives
the current fps of every running stream (frames over the last seconds of the hold).
The theoretical maximum is, summed over workers, the largest n with capacity / n > TARGET_FPS.

Configurations (fresh workers each): ``haproxy`` (the seed's set-up: roundrobin with
``agent-check agent-inter 1s``, agents answering by the seed's rule), ``balancer``
(TARGET_FPS=30), or, when the balancer has a predictive admission switch,
``balancer-reactive`` and ``balancer-predictive`` (the switch off and on). The
configurations of one repetition run side by side (each run takes ~50 s and its
figures are counts, not timings); repetitions follow one another.

    python3 -m scripts.bench.density [--reps 3] [--quick | --smoke] [--sequential]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts.bench import common
from scripts.bench.common import START_PATH, STATUS_PATH, Child, fmt, median, table

NAME = "density"
TITLE = "Stream density"
START_BODY = (b'{"source": {"uri": "file:///home/pipeline-server/samples/video/person-bicycle-car-detection.mp4", '
              b'"type": "uri"}, "parameters": {"detection-device": "CPU"}}')
TARGETS = {"text": "admitted = theoretical maximum, with 0 streams below target"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.density", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, reps=3)
    p.add_argument("--capacities", default=None, help="worker capacities in fps (default 130,130,700)")
    p.add_argument("--target-fps", type=float, default=30.0, help="TARGET_FPS (default 30)")
    p.add_argument("--interval", type=float, default=None, help="seconds between two starts (default 0.5)")
    p.add_argument("--refusals", type=int, default=None, help="consecutive refusals that end the filling (5)")
    p.add_argument("--hold", type=float, default=None, help="seconds the streams run before reading (default 30)")
    p.add_argument("--sequential", action="store_true", help="run the configurations one after another")
    p.add_argument("--predictive-env", default=None, metavar="NAME=VALUE",
                   help="environment that turns predictive admission on (default: found in AdmissionSettings)")
    return p.parse_args(argv)


def theoretical(capacities: Sequence[float], target: float) -> list[int]:
    """Per worker, the largest n with capacity / n > target."""
    return [max(0, math.ceil(c / target) - 1) for c in capacities]


def predictive_envs(explicit: str | None) -> tuple[dict[str, dict[str, str]], str]:
    """Balancer configurations -> extra environment: ``balancer`` alone, or ``balancer-reactive`` and
    ``balancer-predictive`` when the balancer has a predictive admission switch."""
    if explicit:
        name, _, value = explicit.partition("=")
        return {"balancer": {}, "balancer-predictive": {name: value}}, f"predictive admission: {explicit}"
    for name, (default, env) in common.admission_fields().items():
        if "predict" in name and env and isinstance(default, bool):
            return ({"balancer-reactive": {env: "false"}, "balancer-predictive": {env: "true"}},
                    f"predictive admission: AdmissionSettings.{name}, ${env}=false (reactive) or true "
                    f"(predictive); the balancer's default is {str(default).lower()}")
    return {"balancer": {}}, "no predictive admission setting in AdmissionSettings"


def frames(entry: dict[str, Any]) -> float | None:
    if entry.get("elapsed_time") is None:
        return None
    return float(entry.get("avg_fps") or 0) * float(entry["elapsed_time"])


def current_fps(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per RUNNING instance in ``after``: fps between the two snapshots (cumulative avg_fps lags)."""
    old = {e["id"]: e for e in before}
    out = []
    for e in after:
        if e["state"] != "RUNNING":
            continue
        prev = old.get(e["id"])
        fps = None
        if prev is not None and prev.get("elapsed_time") is not None:
            gap = float(e["elapsed_time"]) - float(prev["elapsed_time"])
            f0, f1 = frames(prev), frames(e)
            if gap > 0 and f0 is not None and f1 is not None:
                fps = (f1 - f0) / gap
        out.append({"id": e["id"], "avg_fps": round(float(e["avg_fps"]), 2),
                    "current_fps": None if fps is None else round(fps, 2)})
    return out


def one_run(config: str, run: int, opts: dict[str, Any]) -> dict[str, Any]:
    capacities, target = opts["capacities"], opts["target_fps"]
    workers = [common.start_sim_worker(c, common.bench_mac(i, run), target_fps=target, agent=True,
                                       name=f"{config}-worker{i}") for i, c in enumerate(capacities)]
    front: Child | None = None
    limits: dict[str, Any] | None = None
    try:
        common.wait_workers(workers)
        if config == "haproxy":
            front = common.start_haproxy(common.backends_of(workers), name=f"haproxy-{run}")
            common.wait_haproxy_agents(front, len(workers))
        else:
            env = {"TARGET_FPS": f"{target:g}", **opts["balancer_envs"][config]}
            front = common.start_balancer([w.url for w in workers], env=env, name=f"{config}-{run}")
            limits = common.get_json(front.url + "/backends").get("limits")
        answers: list[dict[str, Any]] = []
        streak, began = 0, time.monotonic()
        max_starts = sum(opts["theoretical"]) * 2 + 10
        while streak < opts["refusals"] and len(answers) < max_starts and time.monotonic() - began < opts["fill_s"]:
            t = time.monotonic()
            status, body = common.http("POST", front.url + START_PATH, START_BODY, timeout=10)
            answers.append({"t": round(t - began, 2), "status": status,
                            "body": body[:200].decode(errors="replace") if status != 200 else ""})
            streak = streak + 1 if status != 200 else 0
            common.pause(opts["interval"] - (time.monotonic() - t))
        fill_s = time.monotonic() - began
        gap = min(10.0, opts["hold"] / 2)
        common.pause(opts["hold"] - gap)
        before = [common.get_json(w.url + STATUS_PATH) for w in workers]
        common.pause(gap)
        after = [common.get_json(w.url + STATUS_PATH) for w in workers]
    finally:
        common.stop_all([*workers, *([front] if front else [])])
    per_worker = []
    for w, b, a, n_max in zip(workers, before, after, opts["theoretical"], strict=True):
        streams = current_fps(b, a)
        below = [s for s in streams if s["current_fps"] is not None and s["current_fps"] < target]
        per_worker.append({"capacity_fps": w.extra["capacity"], "theoretical": n_max, "running": len(streams),
                           "listed": len(a), "below_target": len(below),
                           "min_fps": min((s["current_fps"] for s in streams if s["current_fps"] is not None),
                                          default=None),
                           "streams": streams})
    admitted = sum(1 for a in answers if a["status"] == 200)
    first_refusal = next((i + 1 for i, a in enumerate(answers) if a["status"] != 200), None)
    result = {
        "config": config, "admitted": admitted, "theoretical": sum(opts["theoretical"]),
        "running": sum(w["running"] for w in per_worker), "below_target": sum(w["below_target"] for w in per_worker),
        "per_worker_running": [w["running"] for w in per_worker],
        "refused": sum(1 for a in answers if a["status"] != 200), "starts_sent": len(answers),
        "first_refusal_at_start": first_refusal, "fill_s": round(fill_s, 1),
        "ended_by": "refusals" if streak >= opts["refusals"] else "limit",
        "per_worker": per_worker, "answers": answers, "balancer_limits": limits,
    }
    result["met"] = result["admitted"] == result["theoretical"] and result["below_target"] == 0
    return result


def summarize(runs: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        rows.append({
            "config": config, "runs": len(mine), "theoretical": mine[0]["theoretical"],
            **{k: median([r[k] for r in mine]) for k in ("admitted", "below_target", "running", "fill_s")},
            "each": {k: [r[k] for r in mine] for k in ("admitted", "below_target", "per_worker_running",
                                                         "first_refusal_at_start", "ended_by")},
            "met_runs": sum(1 for r in mine if r["met"]),
        })
    return rows


def render(rows: list[dict[str, Any]], opts: dict[str, Any], reps: int) -> str:
    caps = ", ".join(f"{c:g}" for c in opts["capacities"])
    theo = " + ".join(map(str, opts["theoretical"]))
    body = []
    for r in rows:
        def each(key: str, r: dict[str, Any] = r) -> str:
            values = r["each"][key]
            return fmt(r[key], 0) if len(set(values)) == 1 else f"{fmt(r[key], 0)} ({','.join(map(str, values))})"

        split = {"/".join(map(str, p)) for p in r["each"]["per_worker_running"]}
        body.append([r["config"], f"{r['theoretical']} ({theo})", each("admitted"), each("below_target"),
                     "; ".join(sorted(split)), ", ".join(str(x) for x in r["each"]["first_refusal_at_start"]),
                     f"{r['met_runs']}/{r['runs']}"])
    return (f"Workers of {caps} fps, TARGET_FPS={opts['target_fps']:g}, file sources; one start every "
            f"{opts['interval']:g} s until {opts['refusals']} refusals in a row, then {opts['hold']:g} s of running; "
            f"below target = current fps (frames over the last {min(10.0, opts['hold'] / 2):g} s, from the "
            f"workers' own status) < TARGET_FPS. Medians of {reps} repetitions (each value in brackets when "
            f"they differ). {opts['predictive_note']}.\n\n"
            + table(["config", "theoretical max", "admitted", "below target", "streams per worker",
                     "first refusal at start #", "target met"], body))


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [r["admitted"] for r in rows], 0.4, label="admitted")
    ax.bar([x + 0.2 for x in xs], [r["below_target"] for r in rows], 0.4, label="below TARGET_FPS", color="tab:red")
    if rows:
        ax.axhline(rows[0]["theoretical"], color="k", linestyle="--", label=f"theoretical max {rows[0]['theoretical']}")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["config"] for r in rows])
    ax.set_ylabel("streams")
    ax.set_ylim(0, 1.3 * max([1, *(r["admitted"] for r in rows), *(r["theoretical"] for r in rows)]))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.set_title("Stream density (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    common.use_source(args.src)
    common.require_tools("haproxy")
    capacities = [float(c) for c in (args.capacities or ("70,70,130" if args.smoke else "130,130,700")).split(",")]
    reps = args.reps or (1 if args.smoke or args.quick else 3)
    opts: dict[str, Any] = {
        "capacities": capacities, "target_fps": args.target_fps,
        "interval": args.interval or (0.25 if args.smoke else 0.5),
        "refusals": args.refusals or (3 if args.smoke else 5),
        "hold": args.hold if args.hold is not None else (1.0 if args.smoke else 10.0 if args.quick else 30.0),
        "fill_s": 2.0 if args.smoke else 90.0,
    }
    opts["theoretical"] = theoretical(capacities, args.target_fps)
    envs, note = predictive_envs(args.predictive_env)
    opts["balancer_envs"], opts["predictive_note"] = envs, note[0].upper() + note[1:]
    configs = ["haproxy", *envs]
    paths = common.results_paths(NAME, args)
    params = {**opts, "reps": reps, "configs": configs, "parallel": not args.sequential, "smoke": args.smoke,
              "quick": args.quick, "source": "file (unthrottled)", "destination": "none",
              "balancer_settings": "defaults (poll 1 s, FPS_WARMUP 5 s) + TARGET_FPS"}
    doc = common.document(NAME, TITLE, params, started)
    print(f"{TITLE}: {params}")
    runs: list[dict[str, Any]] = []
    run_id = 100
    for rep in range(reps):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        if args.sequential:
            results = []
            for config in order:
                run_id += 1
                results.append(one_run(config, run_id, opts))
        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(order))
            try:
                futures = []
                for config in order:
                    run_id += 1
                    futures.append(pool.submit(one_run, config, run_id, opts))
                results = [f.result() for f in futures]
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        for result in results:
            result["rep"] = rep
            runs.append(result)
            print(f"rep {rep} {result['config']:20} admitted {result['admitted']:3} (max {result['theoretical']}) "
                  f"below target {result['below_target']:3} per worker {result['per_worker_running']} "
                  f"first refusal at start {result['first_refusal_at_start']} ended by {result['ended_by']}",
                  flush=True)
    unwired = sorted({r["config"] for r in runs if r["config"] != "haproxy" and r["balancer_limits"] is not None
                      and "predictive" not in r["balancer_limits"] and r["config"] != "balancer"})
    if unwired:
        opts["predictive_note"] += (" (this build's /backends limits do not show the switch: it may not be wired "
                                    f"into admission yet, so {' and '.join(unwired)} may be the same balancer)")
    rows = summarize(runs, configs)
    markdown = render(rows, opts, reps)
    print("\n" + markdown)
    doc.update(configs=configs, runs=runs, summary=rows, targets=TARGETS)
    plot(rows, paths[1])
    common.write_results(doc, paths, markdown, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bound = args.max_seconds or (60 if args.smoke else 600)
    return common.run_main(lambda: bench(args), bound)


if __name__ == "__main__":
    sys.exit(main())
