"""Many lightweight fake workers in one process: a minimal HTTP/1.1 server on each of ``--count`` ports.

Each fake worker holds ``--instances`` RUNNING instances (ids ending in its own
MAC) and answers, from bytes built once at start-up:
``GET /pipelines/status`` (its list, shaped and indented like the real server's),
``GET /pipelines/status/{id}`` and ``GET /pipelines`` (an empty list); anything
else is 404. Keep-alive, pipelining and request bodies are handled; nothing else
is. 50 real simulated workers would need 50 Python processes on 2 cores; this
costs one process and a few microseconds per answer, so the balancer is what a
latency measurement sees.

    python3 -m scripts.bench.fakeworkers --count 50 --instances 20 --ports-file ports.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any

START_TIME = 1795874954.55


def entry(instance_id: str, n: int) -> dict[str, Any]:
    return {"avg_fps": round(30.0 + (n % 7) * 0.37, 2), "avg_pipeline_latency": 0.0331, "elapsed_time": 120.5 + n,
            "id": instance_id, "message": "", "start_time": START_TIME + n, "state": "RUNNING"}


def worker_mac(index: int) -> str:
    return f"02fa{index:08x}"


def build_answers(index: int, instances: int) -> dict[bytes, bytes]:
    """Request target -> full HTTP response, for one fake worker."""
    mac = worker_mac(index)
    entries = [entry(f"{0x1e00000 + n:020x}{mac}", n) for n in range(instances)]

    def response(status: str, payload: Any) -> bytes:
        body = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode() + body)

    answers = {b"/pipelines/status": response("200 OK", entries), b"/pipelines": response("200 OK", [])}
    for e in entries:
        answers[f"/pipelines/status/{e['id']}".encode()] = response("200 OK", e)
    answers[b"*unknown-instance"] = response("400 BAD REQUEST", "Invalid instance")
    answers[b"*404"] = response("404 NOT FOUND", {"detail": "not found", "status": 404})
    return answers


class FakeWorker(asyncio.Protocol):
    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers
        self.buffer = b""
        self.body_left = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        close = False
        while True:
            if self.body_left:
                taken = min(self.body_left, len(self.buffer))
                self.buffer = self.buffer[taken:]
                self.body_left -= taken
                if self.body_left:
                    break
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            target = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    self.body_left = int(value.strip() or 0)
                elif lowered == b"connection" and value.strip().lower() == b"close":
                    close = True
            answer = self.answers.get(target)
            if answer is None:
                unknown = target.startswith(b"/pipelines/status/")
                answer = self.answers[b"*unknown-instance" if unknown else b"*404"]
            out.append(answer)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if close:
                self.transport.close()


async def serve(count: int, instances: int, ports_file: Path, host: str) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    ports = []
    for index in range(count):
        answers = build_answers(index, instances)
        server = await loop.create_server(functools.partial(FakeWorker, answers), host, 0, backlog=1024)
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ports": ports, "macs": [worker_mac(i) for i in range(count)]}))
    tmp.rename(ports_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m scripts.bench.fakeworkers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, required=True, help="how many fake workers (ports)")
    p.add_argument("--instances", type=int, default=20, help="instances each worker lists")
    p.add_argument("--ports-file", type=Path, required=True, help="written (JSON) once every port listens")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.count, args.instances, args.ports_file, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
