"""Maps every failure to the one JSON error shape: `{"error": {"code", "message", "details"?}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from app.errors import OCRError, Retryable, Unauthorized

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code.", examples=["too_many_pages"])
    message: str = Field(description="What went wrong, for people.")
    details: dict[str, object] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


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
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OCRError, _ocr_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
