"""Maps every failure to the one JSON error shape: `{"error": {"code", "message", "details"?}}`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.middleware import PROBES
from app.errors import OCRError, Retryable, ShuttingDown, Unauthorized

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def error_json(exc: OCRError) -> JSONResponse:
    headers = None
    if isinstance(exc, Retryable):
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="lightonocr"'}
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


async def _ocr_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OCRError)
    if exc.status >= 500:
        # A probe's 503 is its answer, asked every few seconds while the model loads: not one warning each.
        level = logging.DEBUG if request.url.path in PROBES else logging.WARNING
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    return error_json(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error_response(422, "validation_error", problems or "invalid request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(
        exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), dict(exc.headers or {})
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the incident was logged")


class ShutdownGuard:
    """Answers 503 `shutting_down` to a request the server cancels (SIGTERM, and the grace period ran out).

    uvicorn cancels the tasks still running when `--timeout-graceful-shutdown` expires; left alone, the
    cancellation reaches uvicorn, which logs a traceback and answers a text/plain 500. Nothing else cancels
    a request's own task (a client that leaves is noticed by `until_disconnect`, which cancels only the
    work it watches), so a cancellation arriving here is the server stopping. Streams end themselves with an
    `error` event (`EventStream`); a response already under way is left to close.

    uvicorn runs only the lifespan's shutdown after cancelling, then exits: the lifespan waits for these
    answers with `finish_cut_requests`, so the tasks are tracked in `tasks`.
    """

    def __init__(self, app: ASGIApp, tasks: set[asyncio.Task[Any]]) -> None:
        self.app = app
        self.tasks = tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        self.tasks.add(task)
        try:
            await self._guarded(task, scope, receive, send)
        finally:
            self.tasks.discard(task)

    async def _guarded(self, task: asyncio.Task[Any], scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            task.uncancel()  # answered here: the cancellation ends with this request
            log.warning("%s %s cut by the server's shutdown (past its grace period)", scope["method"], scope["path"])
            if not watched.started:
                await error_json(shutting_down(scope))(scope, receive, send)


class WatchedSend:
    """An ASGI `send` that remembers whether the response started: after that, no JSON error can be sent."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


def shutting_down(scope: Scope) -> ShuttingDown:
    """The error for a request cut by shutdown; Retry-After is RETRY_AFTER_S when the service is up."""
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    retry_after = getattr(getattr(service, "settings", None), "retry_after_s", 5)
    return ShuttingDown(
        "the server is shutting down and stopped this request before it finished; retry it",
        retry_after=retry_after,
    )


async def finish_cut_requests(app: FastAPI, timeout_s: float = 5.0) -> None:
    """At shutdown, before the engine closes: let requests the server cancelled send their 503 (bounded)."""
    tasks: set[asyncio.Task[Any]] = app.state.request_tasks
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout_s)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OCRError, _ocr_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.state.request_tasks = set()
    app.add_middleware(ShutdownGuard, tasks=app.state.request_tasks)  # innermost: access log and metrics see it
