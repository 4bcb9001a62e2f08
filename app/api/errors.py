"""Maps every failure to the one JSON error shape: `{"error": {"code", "message", "details"?}}`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.middleware import PROBES
from app.errors import ClientDisconnected, OCRError, Retryable, ShuttingDown, Unauthorized

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable machine-readable code (see the table in the API description).", examples=["too_many_pages"]
    )
    message: str = Field(description="What went wrong, for people; wording may change, branch on `code`.")
    details: dict[str, object] | None = Field(
        default=None,
        description="Machine-readable facts about this error, when it has any (e.g. `max_pages`).",
        examples=[{"pages_selected": 120, "max_pages": 100}],
    )


class ErrorResponse(BaseModel):
    """Every error, whatever the route, has this one shape."""

    error: ErrorBody = Field(description="The error.")


# What each code means to a caller. The API description's table is built from this and the classes in
# app/errors.py (tests/api/test_metrics.py checks every code has a line).
WHEN: dict[str, str] = {
    "malformed_request": "not `multipart/form-data`, or a broken multipart body",
    "multiple_files": "more than one `file` part",
    "bad_request": "the request cannot be understood",
    "unauthorized": "API keys are on and the key is missing or wrong (with `WWW-Authenticate`)",
    "not_found": "unknown route",
    "method_not_allowed": "known route, other method",
    "upload_timeout": "no byte of the upload for `UPLOAD_IDLE_TIMEOUT_S`, or it took longer than `UPLOAD_TIMEOUT_S`",
    "file_too_large": "the file is over `MAX_FILE_SIZE_MB` (detected while reading)",
    "field_too_large": "a form field is over `MAX_FIELD_SIZE_KB`",
    "unsupported_media_type": "the bytes are not a supported document type",
    "missing_file": "no `file` field (details: `received_as` when a file came under another field name)",
    "unknown_field": "a form field or query parameter the route does not take (details: `fields`, `accepted`)",
    "invalid_document": "the document cannot be read",
    "empty_document": "empty file, or a PDF with no pages",
    "corrupt_document": "the PDF or image cannot be read",
    "password_required": "encrypted PDF without `password`",
    "wrong_password": "encrypted PDF with a wrong `password`",
    "too_many_pages": "more pages selected than `MAX_PAGES`",
    "image_too_large": "more pixels than `MAX_IMAGE_PIXELS`",
    "invalid_pages": "bad `pages` value, or a page past the end",
    "validation_error": "other request validation failures",
    "too_many_requests": "the client is over a per-client limit (with `Retry-After`)",
    "rate_limited": "the client is over `RATE_LIMIT_PAGES_PER_MIN` (with `Retry-After`)",
    "too_many_pages_in_flight": "the client is over `KEY_MAX_PAGES_IN_FLIGHT` (with `Retry-After`)",
    "internal_error": "an unexpected failure; the incident was logged",
    "engine_error": "the engine failed on the only page (repeated 5xx, bad answer)",
    "page_rejected": "the model cannot process this page (vLLM 400, or 500 for this input); not retried",
    "document_failed": "more than `MAX_FAILED_PAGE_RATIO` of the pages failed",
    "service_unavailable": "the service cannot take work now (with `Retry-After`)",
    "overloaded": "more than `MAX_QUEUED_PAGES` pages waiting (with `Retry-After`)",
    "engine_not_ready": "the model is still loading (with `Retry-After`)",
    "engine_unavailable": "the model failed to load, vLLM is unreachable or serves another model (with `Retry-After`)",
    "shutting_down": "the server stopped before the request finished (SIGTERM past `SHUTDOWN_GRACE_S`; with "
    "`Retry-After`); a stream ends with this `error` event",
    "engine_timeout": "a page took longer than `VLLM_PAGE_TIMEOUT_S`",
    "request_timeout": "the pages did not finish within `REQUEST_TIMEOUT_S` (details: pages done/total)",
    "invalid_callback_url": "the callback URL is not acceptable",
    "job_not_found": "unknown job, another key's job, or an expired one",
    "job_conflict": "the job is not in a state that allows the request",
    "job_not_finished": "the job has no result yet",
    "job_failed": "the job failed; its error says why",
    "job_cancelled": "the job was cancelled: it has no result (its finished pages are in `GET /api/jobs/{id}`)",
    "jobs_storage_full": "job storage is full until older jobs expire",
}
# The code shown as each status's example in /docs.
_EXAMPLE = {400: "malformed_request", 422: "too_many_pages", 429: "rate_limited", 503: "engine_not_ready"}
# Raised by the framework, not by an `OCRError`.
_HTTP_ERRORS = ((404, "not_found"), (405, "method_not_allowed"), (422, "validation_error"))


def _error_classes() -> dict[str, type[OCRError]]:
    found: dict[str, type[OCRError]] = {}
    pending: list[type[OCRError]] = [OCRError]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.status != ClientDisconnected.status:  # the client left: nobody receives it
            found.setdefault(cls.code, cls)
    return found


def error_codes() -> list[tuple[int, str]]:
    """(status, code) of every error a client can receive, by status then code."""
    codes = {(cls.status, code) for code, cls in _error_classes().items()}
    return sorted(codes | set(_HTTP_ERRORS))


def describe_code(code: str) -> str:
    """WHEN's line, else the error class's docstring, so a new error is never listed bare."""
    if code in WHEN:
        return WHEN[code]
    cls = _error_classes().get(code)
    doc = (cls.__doc__ or "").strip().splitlines() if cls is not None else []
    return doc[0] if doc else code.replace("_", " ")


def error_table() -> str:
    """The error codes as a markdown table, for the API description."""
    rows = [f"| {status} | `{code}` | {describe_code(code)} |" for status, code in error_codes()]
    return "\n".join(["| status | code | when |", "|---|---|---|", *rows])


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses: the error model, the codes each can carry, an example."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = [code for code_status, code in error_codes() if code_status == status]
        example = _EXAMPLE.get(status) or (codes[0] if codes else "internal_error")
        responses[status] = {
            "model": ErrorResponse,
            "description": "Codes: " + ", ".join(f"`{code}`" for code in codes) + ".",
            "content": {
                "application/json": {"example": {"error": {"code": example, "message": describe_code(example)}}}
            },
        }
    return responses


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


def document_validation_errors(app: FastAPI) -> None:
    """Make /docs tell the truth about 422: FastAPI documents its own shape, the handler above sends ours."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        ours = jsonable_encoder(error_responses(422)[422]["content"]["application/json"]["example"])
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                response = operation.get("responses", {}).get("422")
                if response is not None and "HTTPValidationError" in str(response):
                    response["description"] = error_responses(422)[422]["description"]
                    response["content"] = {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                            "example": ours,
                        }
                    }
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)  # every route references ErrorResponse instead
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


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
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except asyncio.CancelledError:
            task.uncancel()  # answered here: the cancellation ends with this request
            log.warning("%s %s cut by the server's shutdown (past its grace period)", scope["method"], scope["path"])
            if not started:
                await error_json(shutting_down(scope))(scope, receive, send)


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
