"""Structured logs: one line per event, ``text`` (key=value) or ``json``.

Request bodies are never logged (they hold camera URIs, often with passwords);
any URL that is logged goes through :func:`redact` first.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#]*@")
"""Up to the last ``@`` of the authority, so a password holding an unencoded ``@`` goes too."""


def redact(text: str) -> str:
    """``rtsp://user:pass@cam/x`` → ``rtsp://***@cam/x``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _redact_value(value: Any) -> Any:
    """A log field with every string in it redacted (JSON logs keep the field's shape)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        entry.update(_redact_value(getattr(record, "fields", {})))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = "".join(f" {k}={_text(v)}" for k, v in fields.items())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {redact(record.getMessage())}{extra}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def _text(value: Any) -> str:
    text = redact(str(value))
    return json.dumps(text) if (" " in text or not text) else text


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs a client's malformed request (bad request line, bad header) as an ERROR with a
    traceback; it is the client's fault: one INFO line, so a client cannot flood the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.msg = "bad request from %s: %s"
            record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "?",
                           (exc.message or str(exc)).strip().splitlines()[0][:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorFilter) for f in server_log.filters):
        server_log.addFilter(_ClientErrorFilter())


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (``key=value`` in text, keys in JSON)."""
    logger.log(level, message, extra={"fields": fields})
