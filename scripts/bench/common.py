"""What every benchmark shares: child processes, tools, wrk, /proc readings, HAProxy config, results.

Every child runs in its own session (process group) and is registered here, so
:func:`cleanup_all` can always stop it with its children: a benchmark's ``main``
wraps its work in :func:`guarded`, which also bounds the whole run in time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results"
START_PATH = "/pipelines/object_detection/person_vehicle_bike"
STATUS_PATH = "/pipelines/status"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TOOLS = {
    "wrk": ("wrk", ["/usr/bin/wrk"]),
    "haproxy": ("haproxy", ["/usr/sbin/haproxy"]),
    "nginx": ("nginx-light (or nginx)", ["/usr/sbin/nginx"]),
}
"""tool -> (Debian package, usual paths outside $PATH)."""

MISSING_TOOL_EXIT = 3


class MissingTool(RuntimeError):
    """A required program is not installed."""


class BenchTimeout(RuntimeError):
    """The whole benchmark ran past its time bound."""


# ---- tools ---------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """The path of ``name`` (wrk, haproxy, nginx), or MissingTool naming the Debian package."""
    package, paths = TOOLS[name]
    found = shutil.which(name) or next((p for p in paths if os.access(p, os.X_OK)), None)
    if found is None:
        raise MissingTool(f"{name} is not installed: install the Debian package '{package}' "
                          f"(apt-get install -y {package.split()[0]})")
    return found


def require_tools(*names: str) -> dict[str, str]:
    """Every tool's path, or one MissingTool listing all that are missing."""
    paths, missing = {}, []
    for name in names:
        try:
            paths[name] = tool(name)
        except MissingTool as exc:
            missing.append(str(exc))
    if missing:
        raise MissingTool("; ".join(missing))
    return paths


def tool_version(name: str) -> str:
    try:
        path = tool(name)
    except MissingTool:
        return "missing"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


# ---- ports and waiting ---------------------------------------------------------------------------
_port_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, never handed out twice by this process."""
    with _port_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def wait_port(host: str, port: int, timeout: float = 15.0, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.popen.returncode}):\n{child.output()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept within {timeout}s")


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request with urllib: (status, body), HTTP errors included."""
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, timeout: float = 10.0) -> Any:
    status, body = http("GET", url, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"GET {url} answered {status}: {body[:200]!r}")
    return json.loads(body)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, RuntimeError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last})")


# ---- child processes -----------------------------------------------------------------------------
stopping = threading.Event()
"""Set when the run is being torn down: loops in helper threads check it (see :func:`pause`)."""
_children_lock = threading.Lock()
_children: list[Child] = []
_tmp_root: Path | None = None


_tmp_lock = threading.Lock()


def tmp_root() -> Path:
    """This run's temp directory (removed by :func:`guarded`); one per run, also when threads ask at once."""
    global _tmp_root
    with _tmp_lock:
        if _tmp_root is None:
            _tmp_root = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        return _tmp_root


def tmp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=tmp_root()))


@dataclass
class Child:
    """A child process in its own process group, output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the group, SIGKILL to the group if it is still there after ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything the leader left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        with _children_lock:
            if self in _children:
                _children.remove(self)


def spawn(args: Sequence[str], name: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
    """Start ``args`` in a new session (in the balancer source tree unless ``cwd``); stdout and stderr
    go to a log in the run's temp dir."""
    log_path = tmp_root() / f"{name}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                 start_new_session=True, cwd=cwd or source.path)
    child = Child(name, popen, log_path)
    with _children_lock:
        _children.append(child)
    return child


def stop_all(children: Sequence[Child]) -> None:
    """Stop several children at once: SIGTERM all, then wait for each."""
    for child in children:
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
    for child in children:
        child.stop()


def cleanup_all() -> None:
    with _children_lock:
        children = list(_children)
    stop_all(children)


@contextlib.contextmanager
def guarded(max_seconds: float) -> Iterator[None]:
    """Bound the run in time (SIGALRM), turn SIGTERM into an exception, always stop every child."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"benchmark exceeded its bound of {max_seconds:.0f}s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    stopping.clear()
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    old_term = signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, max_seconds)
    try:
        yield
    finally:
        stopping.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)
        cleanup_all()
        global _tmp_root
        with _tmp_lock:
            if _tmp_root is not None:
                shutil.rmtree(_tmp_root, ignore_errors=True)
                _tmp_root = None


def pause(seconds: float) -> None:
    """Sleep, or raise at once when the run is being torn down (so helper threads end)."""
    if stopping.wait(max(0.0, seconds)):
        raise RuntimeError("benchmark stopping")


# ---- /proc readings ------------------------------------------------------------------------------
def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree = _children_of()
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(tree.get(current, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident memory (``VmRSS``, or ``VmHWM`` for the peak) of ``pid`` and its descendants, in MB."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ---- wrk -----------------------------------------------------------------------------------------
@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]
    """Socket errors (connect, read, write, timeout) and ``status``: answers that were not 2xx/3xx."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, '
    .. '"timeout": %d, "p50": %.1f, "p90": %.1f, "p99": %.1f, "max": %.1f, "mean": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(directory: Path, name: str, method: str = "GET", body: bytes | None = None) -> Path:
    """A wrk Lua script: the request, plus a ``done`` hook that prints exact figures as JSON."""
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        text = body.decode()
        if "]]" in text:
            raise ValueError("body must not contain ']]'")
        lines.append(f"wrk.body = [[{text}]]")
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    path = directory / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n" + _WRK_DONE)
    return path


def run_wrk(url: str, script: Path, connections: int, duration: float, threads: int = 1,
            timeout_s: float | None = None) -> WrkResult:
    """One wrk run of ``duration`` whole seconds (wrk takes no fractions), killed if it runs 15 s over."""
    wrk = tool("wrk")
    args = [wrk, "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{timeout_s or 10:g}s", "-s", str(script), url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=duration + 15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"wrk against {url} did not finish in time") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    match = re.search(r"^BENCHJSON (\{.*\})$", text, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(args)}\n{text[-2000:]}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"], duration_s=round(seconds, 3),
        rps=round(raw["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=raw["p50"] / 1000, p90_ms=raw["p90"] / 1000, p99_ms=raw["p99"] / 1000,
        max_ms=raw["max"] / 1000, mean_ms=round(raw["mean"] / 1000, 4),
        errors={k: raw[k] for k in ("connect", "read", "write", "timeout", "status")},
    )


# ---- the system under test -----------------------------------------------------------------------
@dataclass
class Source:
    """The balancer source tree that ``python3 -m balancer`` runs from (children start in it)."""

    path: Path = REPO
    label: str = "working tree"
    commit: str = ""


source = Source()


def use_source(spec: str | None) -> Source:
    """``None``: this checkout as it is; a directory: that tree; else a git revision (e.g. ``HEAD``),
    exported with ``git archive`` to the run's temp dir, so edits in progress in the checkout
    do not leak into a measurement."""
    global source
    if spec is None:
        source = Source(REPO, "working tree", git_describe(REPO))
    elif Path(spec).is_dir():
        source = Source(Path(spec).resolve(), f"directory {spec}", git_describe(Path(spec)))
    else:
        rev = subprocess.run(["git", "rev-parse", "--verify", f"{spec}^{{commit}}"], capture_output=True, text=True,
                             timeout=30, cwd=REPO)
        if rev.returncode != 0:
            raise ValueError(f"--src {spec!r} is neither a directory nor a git revision")
        commit = rev.stdout.strip()
        target = tmp_dir("src")
        archive = subprocess.run(["git", "archive", "--format=tar", commit], capture_output=True, timeout=60,
                                 cwd=REPO, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, timeout=60, check=True)
        source = Source(target, f"git {spec}", commit[:12])
    return source


def git_describe(path: Path, under: str = "balancer") -> str:
    """Short commit of ``path``'s checkout, with ``-dirty`` when files under ``under`` are modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=path).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", under], capture_output=True, text=True,
                               timeout=10, cwd=path).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def balancer_help() -> str:
    out = subprocess.run(python_cmd("-m", "balancer", "serve", "--help"), capture_output=True, text=True,
                         timeout=30, cwd=source.path)
    return out.stdout


def balancer_fronts() -> list[str]:
    """The front ends ``serve --front`` offers (empty when the option does not exist yet)."""
    text = balancer_help()
    match = re.search(r"--front\s+\{([^}]*)\}", text)
    return [f.strip() for f in match.group(1).split(",")] if match else []


_FIELDS_SCRIPT = """
import dataclasses, json
from balancer.config import AdmissionSettings
print(json.dumps({f.name: [f.default, f.metadata.get("env")] for f in dataclasses.fields(AdmissionSettings)}))
"""


def admission_fields() -> dict[str, tuple[Any, str | None]]:
    """The source tree's ``AdmissionSettings`` fields: name -> (default, environment variable)."""
    out = subprocess.run(python_cmd("-c", _FIELDS_SCRIPT), capture_output=True, text=True, timeout=30,
                         cwd=source.path)
    if out.returncode != 0:
        raise RuntimeError(f"cannot read AdmissionSettings from {source.path}: {out.stderr[-1000:]}")
    return {name: (value[0], value[1]) for name, value in json.loads(out.stdout).items()}


def start_balancer(workers: Sequence[str], env: dict[str, str] | None = None, args: Sequence[str] = (),
                   name: str = "balancer", wait_ready: bool = True, timeout: float = 30.0) -> Child:
    """``python3 -m balancer serve`` on a free loopback port, in front of ``workers``."""
    port = free_port()
    cmd = python_cmd("-m", "balancer", "serve", "--listen", f"127.0.0.1:{port}", "--workers", ",".join(workers),
                     "--log-level", "WARNING", *args)
    child = spawn(cmd, name, env=env)
    child.url = f"http://127.0.0.1:{port}"
    child.extra = {"workers": len(workers)}
    if wait_ready:
        wait_balancer(child, timeout)
    return child


def wait_balancer(child: Child, timeout: float = 30.0) -> None:
    """Until the balancer answers and every one of its workers is ``ready``."""
    port = int(child.url.rsplit(":", 1)[1])
    wait_port("127.0.0.1", port, timeout, child)

    def ready() -> bool:
        states = [w["state"] for w in get_json(child.url + "/backends")["workers"]]
        return len(states) == child.extra["workers"] and all(s == "ready" for s in states)

    wait_until(ready, timeout, f"{child.name}: all {child.extra['workers']} workers ready")


def start_sim_worker(capacity: float, mac: str, max_running: int = 0, target_fps: float = 0.0,
                     agent: bool = False, name: str = "worker") -> Child:
    """A simulated worker (``python3 -m balancer worker``) with exact rates (``--noise 0``)."""
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--capacity-fps", f"{capacity:g}", "--noise", "0", "--mac", mac,
            "--max-running-pipelines", str(max_running), "--target-fps", f"{target_fps:g}", "--log-level", "WARNING"]
    agent_port = None
    if agent:
        agent_port = free_port()
        args += ["--agent-port", str(agent_port)]
    child = spawn(python_cmd("-m", "balancer", "worker", *args), name)
    child.url = f"http://127.0.0.1:{port}"
    child.extra = {"port": port, "agent_port": agent_port, "mac": mac.replace(":", "").lower(),
                   "capacity": capacity}
    return child


def wait_workers(workers: Sequence[Child], timeout: float = 30.0) -> None:
    for w in workers:
        wait_port("127.0.0.1", w.extra["port"], timeout, w)
        if w.extra.get("agent_port"):
            wait_port("127.0.0.1", w.extra["agent_port"], timeout, w)


def bench_mac(index: int, run: int = 0) -> str:
    """A locally administered MAC, distinct per worker and run."""
    return f"02{run % 256:02x}{(run >> 8) % 256:02x}0000{index % 256:02x}"


# ---- HAProxy (the seed's set-up) -----------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One worker as the seed's HAProxy config names it."""

    name: str
    host: str
    port: int
    mac: str
    agent_port: int | None = None


def haproxy_config(port: int, backends: Sequence[Backend], map_path: Path, stats_socket: Path) -> str:
    """The seed's ``haproxy-template.cfg`` as its ``build.sh`` fills it, with ``balance roundrobin``,
    ``nbthread 1``, agent checks every 1 s where a worker has an agent, and no per-request log
    (the seed logged every request to stdout; the balancer keeps no access log either)."""
    lines = [
        "global",
        "  nbthread 1",
        f"  stats socket {stats_socket} mode 600 level admin",
        "",
        "defaults",
        "  mode http",
        "  timeout client 60s",
        "  timeout connect 5s",
        "  timeout server 60s",
        "  timeout http-request 60s",
        "",
        "frontend myfrontend",
        f"  bind 127.0.0.1:{port}",
        "  acl is_post method POST",
        "  acl is_get method GET",
        "  acl is_delete method DELETE",
        "  use_backend pipeline-servers-post if is_post",
        f"  use_backend %[path,map_sub({map_path},pipeline-server0)] if is_get or is_delete",
        "",
        "backend pipeline-servers-post",
        "  balance roundrobin",
    ]
    for b in backends:
        line = f"  server {b.name} {b.host}:{b.port} check weight 100"
        if b.agent_port is not None:
            line += f" agent-check agent-addr {b.host} agent-port {b.agent_port} agent-inter 1s agent-send ping"
        lines.append(line)
    for i, b in enumerate(backends):
        lines += ["", f"backend pipeline-server{i}", f"  server {b.name} {b.host}:{b.port} check"]
    map_path.write_text("".join(f"{b.mac} pipeline-server{i}\n" for i, b in enumerate(backends)))
    return "\n".join(lines) + "\n"


def backends_of(workers: Sequence[Child]) -> list[Backend]:
    """Simulated workers (from :func:`start_sim_worker`) as the seed's HAProxy config lists them."""
    return [Backend(f"w{i}", "127.0.0.1", w.extra["port"], w.extra["mac"], w.extra["agent_port"])
            for i, w in enumerate(workers)]


def start_haproxy(backends: Sequence[Backend], name: str = "haproxy") -> Child:
    """Debian's HAProxy in the foreground (``-db``: one process, no master) on a free loopback port."""
    directory = tmp_dir(name)
    port = free_port()
    cfg = directory / "haproxy.cfg"
    sock = directory / "stats.sock"
    cfg.write_text(haproxy_config(port, backends, directory / "servers.map", sock))
    check = subprocess.run([tool("haproxy"), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}\n{cfg.read_text()}")
    child = spawn([tool("haproxy"), "-db", "-f", str(cfg)], name)
    child.url = f"http://127.0.0.1:{port}"
    child.extra = {"socket": str(sock), "config": str(cfg)}
    wait_port("127.0.0.1", port, 15, child)
    return child


def haproxy_servers(child: Child) -> list[dict[str, str]]:
    """``show stat`` rows of the POST backend's servers (status, weight, agent status ...)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(child.extra["socket"])
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return [r for r in rows if r.get("pxname") == "pipeline-servers-post" and r.get("svname") != "BACKEND"]


def wait_haproxy_agents(child: Child, count: int, timeout: float = 10.0) -> None:
    """Until every POST server is UP and its agent has answered at least once."""

    def ok() -> bool:
        rows = haproxy_servers(child)
        return len(rows) == count and all(
            r["status"].startswith("UP") and r.get("agent_status", "").lstrip("* ") not in ("", "INI", "UNK")
            for r in rows)

    wait_until(ok, timeout, "haproxy servers UP with agent answers")


# ---- statistics and output -----------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (printed as is and pasted into docs/benchmarks.md)."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "tools": {name: tool_version(name) for name in TOOLS},
    }


def add_common_args(parser: argparse.ArgumentParser, reps: int) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="a ~5-10 s run that only checks the machinery")
    size.add_argument("--quick", action="store_true", help="a shorter run for CI: one repetition, shorter runs")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"interleaved repetitions (default {reps}; 1 with --smoke or --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench-results/<name>/); files are latest.json|png|md, "
                             "or quick.* / smoke.* for --quick / --smoke")
    parser.add_argument("--max-seconds", type=float, default=None, help="hard bound on the whole run")
    parser.add_argument("--src", default=None, metavar="DIR|REV",
                        help="balancer to measure: a source directory or a git revision such as HEAD "
                             "(exported to a temp dir); default: this checkout as it is")


def results_paths(name: str, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(json, png, md) for this run: ``latest.*``, or ``smoke.*`` / ``quick.*``."""
    folder = args.out or RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "quick" if args.quick else "latest"
    return folder / f"{stem}.json", folder / f"{stem}.png", folder / f"{stem}.md"


def document(name: str, title: str, params: dict[str, Any], started: float) -> dict[str, Any]:
    """The common head of every results JSON."""
    return {
        "benchmark": name,
        "title": title,
        "command": " ".join(["python3", "-m", f"scripts.bench.{name}", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": source.commit,
        "balancer_source": source.label,
        "bench_commit": git_describe(REPO, "scripts/bench"),
        "machine": machine(),
        "params": params,
        "started_monotonic": started,
    }


def write_results(doc: dict[str, Any], paths: tuple[Path, Path, Path], markdown: str, started: float) -> None:
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_end"] = loadavg()
    doc.pop("started_monotonic", None)
    json_path, png_path, md_path = paths
    json_path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    md_path.write_text(markdown + "\n")
    print(f"\nwrote {json_path}, {png_path}, {md_path} ({doc['duration_s']} s)")


def pyplot() -> Any:
    """matplotlib.pyplot with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_main(body: Callable[[], int], max_seconds: float) -> int:
    """Run a benchmark body bounded in time, children always stopped; missing tools exit 3 with a message."""
    try:
        with guarded(max_seconds):
            return body()
    except MissingTool as exc:
        print(f"error: {exc}", file=sys.stderr)
        return MISSING_TOOL_EXIT
    except BenchTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
