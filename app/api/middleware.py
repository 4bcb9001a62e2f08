"""Request id, metrics and the access log, as one pure ASGI middleware.

Pure ASGI (not `BaseHTTPMiddleware`) so streamed responses pass through untouched
and the request id contextvar is set in the very task that runs the route, from
which page tasks inherit it. It sits outermost, so a 401 from the key middleware
is counted, logged and tagged like any other answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import request_id
from app.metrics import Metrics

HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128
# Probes are scraped every few seconds: kept out of the request metrics, logged at DEBUG.
PROBES = frozenset({"/health", "/ready", "/metrics"})
UNMATCHED = "<unmatched>"

access_log = logging.getLogger("app.access")


def accepted_request_id(value: str | None) -> str | None:
    """A caller's id is kept when it is printable ASCII of 1..128 characters (safe to log and echo)."""
    if value and len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return None


def route_of(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template (`/jobs/{id}`, not the raw path), so metric labels stay bounded."""
    route = scope.get("route")
    if route is None:  # answered before routing (e.g. 401): find the route it was meant for
        route = _find(scope, routes)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


def _find(scope: Scope, routes: Sequence[BaseRoute]) -> BaseRoute | None:
    partial = None
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match is Match.NONE:
            continue
        inner = _nested(candidate)
        found = (_find(scope, inner) if inner else None) or candidate
        if match is Match.FULL:
            return found
        partial = partial or found  # right path, other method (405)
    return partial


def _nested(route: BaseRoute) -> Sequence[BaseRoute]:
    # FastAPI wraps included routers (`original_router`); a Mount lists its app's routes.
    router = getattr(route, "original_router", None)
    nested = getattr(router if router is not None else route, "routes", None)
    return nested if isinstance(nested, list) else []


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER.lower().encode())
        rid = accepted_request_id(given.decode("latin-1") if given else None) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # unless a response starts
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = rid
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            seconds = time.perf_counter() - started
            self._record(scope, status, seconds, received, sent)
            request_id.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float, received: int, sent: int) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        route = route_of(scope, self.routes)
        probe = path in PROBES
        if not probe:
            self.metrics.observe_request(method, route, status, seconds, received, sent)
        client = scope.get("client")
        access_log.log(
            logging.DEBUG if probe else logging.INFO,
            "%s %s %d %.3fs",
            method,
            path,
            status,
            seconds,
            extra={
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "duration_s": round(seconds, 4),
                "bytes_in": received,
                "bytes_out": sent,
                "client": scope.get("state", {}).get("client_id") or (client[0] if client else None),
            },
        )
