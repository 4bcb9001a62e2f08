"""Logging: one JSON object per line (LOG_FORMAT=json) or readable text, each line with its request id.

The request id lives in a contextvar set by the HTTP middleware. asyncio tasks and
anyio worker threads copy the context when they are created, so lines logged by a
request's page tasks (retries, failed pages, engine retries) carry its id too.

Extra fields passed with `log.info(..., extra={"status": 200})` become JSON keys
(or `key=value` pairs in text). Nothing here redacts: callers never log document
text or API keys (keys are identified by `security.key_id`, a hash prefix).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from app.settings import LogFormat

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


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
# Libraries that may put stream handlers of their own on their loggers (huggingface_hub at
# import; transformers and torch also turn propagation off): their lines would bypass
# LOG_FORMAT, and in text mode show twice. Their handlers are removed and their records go up
# to the root logger, to ours. Their own levels are kept (WARNING for the hub, transformers, torch).
THIRD_PARTY = ("huggingface_hub", "transformers", "torch", "accelerate", "tokenizers", "safetensors", "filelock")
# Modules after whose import the libraries above have (re)installed their handlers: the HF engine
# imports them when it loads, long after `setup_logging`.
_TAME_AFTER = frozenset({"huggingface_hub.utils.logging", "transformers", "torch"})


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
            "message": record.getMessage().rstrip(),
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
        line += record.getMessage().rstrip()
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


def route_third_party_loggers(names: Sequence[str] = THIRD_PARTY) -> None:
    """Send these libraries' records to the root logger only: drop their stream handlers, turn propagation on."""
    loggers = logging.root.manager.loggerDict
    for name, logger in list(loggers.items()):
        if not isinstance(logger, logging.Logger) or not any(name == n or name.startswith(n + ".") for n in names):
            continue
        for handler in list(logger.handlers):
            if _writes_to_console(handler):
                logger.removeHandler(handler)
        logger.propagate = True


def _writes_to_console(handler: logging.Handler) -> bool:
    """A stream handler (not a log file), or torch's own stderr handler (a plain `Handler`)."""
    if isinstance(handler, logging.StreamHandler):
        return not isinstance(handler, logging.FileHandler)
    return type(handler).__name__ == "_StderrHandler" and not isinstance(handler, _StderrHandler)


class _RouteAfterImport(importlib.abc.MetaPathFinder):
    """Re-routes the libraries' loggers right after the modules that configure them are imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TAME_AFTER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if isinstance(spec.loader, importlib.abc.Loader) and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RoutingLoader(spec.loader)
                return spec
        return None


class _RoutingLoader(importlib.abc.Loader):
    """The module's own loader, plus `route_third_party_loggers` once the module has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_data, is_package...
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            route_third_party_loggers()


def setup_logging(fmt: LogFormat | str = LogFormat.TEXT, level: str = "INFO") -> None:
    """Install the service's handler on the root logger, replacing only a previous one of ours.

    Other handlers (pytest's, an embedding application's) are left alone. Third-party
    libraries' own handlers are removed, now and whenever they are imported later, so every
    line goes through ours; Python warnings are logged too (`py.warnings`). uvicorn's loggers
    are routed through ours so their lines share the format, and uvicorn's access log is
    turned off: the middleware writes a richer one (`app.access`).
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
    if not any(isinstance(finder, _RouteAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RouteAfterImport())
    route_third_party_loggers()
    logging.captureWarnings(True)  # `warnings.warn` (transformers, torch) as log records, not raw stderr lines
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
