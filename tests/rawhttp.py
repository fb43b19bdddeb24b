"""A raw-socket HTTP/1.1 client for tests that need exact bytes: smuggling, pipelining, half-close, slow clients."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any, BinaryIO


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """One TCP connection to ``host:port``; every read is bounded by ``timeout``."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.file: BinaryIO = self.sock.makefile("rb")

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
                version: str = "HTTP/1.1") -> Raw:
        lines = [f"{method} {path} {version}", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def read(self, head: bool = False) -> Answer:
        """One answer: status line, headers, then a body framed by Content-Length, chunks or the close."""
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed before an answer")
        version, status, *reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version.startswith("HTTP/1."), line
        answer = Answer(int(status), reason[0] if reason else "")
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            answer.headers.append((name.strip(), value.strip()))
        if head or answer.status in (204, 304) or answer.status < 200:
            return answer
        length = answer.header("Content-Length")
        if answer.header("Transfer-Encoding"):
            answer.body = self._chunks()
        elif length is not None:
            answer.body = self.file.read(int(length))
        else:
            answer.body = self.file.read()
        return answer

    def _chunks(self) -> bytes:
        body = b""
        while True:
            size = int(self.file.readline().split(b";")[0], 16)
            if size == 0:
                while self.file.readline() not in (b"\r\n", b""):
                    pass
                return body
            body += self.file.read(size)
            self.file.readline()

    def closed_by_peer(self) -> bool:
        """True when the server has closed the connection (EOF), False if it is still open after the timeout."""
        try:
            return self.file.read(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
