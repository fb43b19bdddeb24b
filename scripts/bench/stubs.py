"""Fast stub workers: one nginx process (Debian's) answering like a Pipeline Server on several ports.

Each stub answers ``POST /pipelines/{name}/{version}`` with a fixed instance id
(a JSON string, like the real server) and ``GET /pipelines/status`` with a fixed
list that holds that id in state RUNNING, so the balancer's reservations settle
at its next poll. Nothing is computed per request: the proxy in front is the
bottleneck, not the stub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from scripts.bench.common import START_PATH, STATUS_PATH, Child, free_port, spawn, tmp_dir, tool, wait_port


@dataclass(frozen=True)
class Stub:
    port: int
    mac: str
    instance_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def stub_status(instance_id: str) -> str:
    """The fixed status list: one running instance, shaped like the real server's entry."""
    entry = {"avg_fps": 30.0, "avg_pipeline_latency": 0.0333, "elapsed_time": 100.0, "id": instance_id,
             "message": "", "start_time": 1795874954.55, "state": "RUNNING"}
    return json.dumps([entry], indent=2, sort_keys=True) + "\n"


def nginx_config(stubs: list[Stub], directory: str) -> str:
    """One master-less nginx process, one worker, no logs; one ``server`` block per stub."""
    servers = []
    for stub in stubs:
        started = json.dumps(stub.instance_id) + "\n"
        servers.append(
            f"""
  server {{
    listen 127.0.0.1:{stub.port} backlog=4096;
    default_type application/json;
    location = {START_PATH} {{ return 200 '{started.strip()}\\n'; }}
    location = {STATUS_PATH} {{ return 200 '{stub_status(stub.instance_id).replace(chr(10), '')}\\n'; }}
    location / {{ return 404 '"not found"\\n'; }}
  }}"""
        )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {directory}/body;
  proxy_temp_path {directory}/proxy;
  fastcgi_temp_path {directory}/fastcgi;
  uwsgi_temp_path {directory}/uwsgi;
  scgi_temp_path {directory}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server_tokens off;
{''.join(servers)}
}}
"""


def start_stubs(count: int) -> tuple[Child, list[Stub]]:
    """``count`` stub workers served by one nginx process."""
    directory = tmp_dir("nginx")
    stubs = []
    for i in range(count):
        mac = f"0200000000{i + 1:02x}"
        stubs.append(Stub(free_port(), mac, f"{0x1f0000000000000 + i:020x}{mac}"[-32:]))
    cfg = directory / "nginx.conf"
    cfg.write_text(nginx_config(stubs, str(directory)))
    child = spawn([tool("nginx"), "-c", str(cfg), "-p", str(directory), "-e", str(directory / "error.log")], "nginx")
    for stub in stubs:
        wait_port("127.0.0.1", stub.port, 15, child)
    return child, stubs
