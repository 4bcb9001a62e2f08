"""Logging: one JSON object per line (LOG_FORMAT=json) or readable text, each line with its request id.

The request id lives in a contextvar set by the HTTP middleware. asyncio tasks and
anyio worker threads copy the context when they are created, so lines logged by a
request's page tasks (retries, failed pages, engine retries) carry its id too.

Extra fields passed with `log.info(..., extra={"status": 200})` become JSON keys
(or `key=value` pairs in text). Nothing here redacts: callers never log document
text or API keys (keys are identified by `security.key_id`, a hash prefix).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

LogFormat = Literal["json", "text"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn adds `color_message` (the message with ANSI colours): dropped too.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}
# Third-party loggers that are chatty at INFO.
_QUIET = ("httpx", "httpcore", "multipart", "python_multipart")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class _RequestIdFilter(logging.Filter):
    """Stamps the current request id on every record the handler sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so log shippers need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        line = f"{self.formatTime(record)} {record.levelname} {record.name}{f' [{rid}]' if rid else ''}: "
        line += record.getMessage()
        line += "".join(f" {key}={value}" for key, value in extra_fields(record).items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at emit time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Install the service's handler on the root logger, replacing only a previous one of ours.

    Other handlers (pytest's, an embedding application's) are left alone. uvicorn's
    loggers are routed through ours so their lines share the format, and uvicorn's
    access log is turned off: the middleware writes a richer one (`app.access`).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
