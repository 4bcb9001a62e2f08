"""Routes: inference, info and the two probes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app import __version__
from app.api.errors import ErrorResponse
from app.api.security import client_id
from app.api.upload import Upload, read_upload
from app.errors import ClientDisconnected, ServiceUnavailable
from app.results import DocumentResult
from app.service import OCRService

API_VERSION = "1.0"

router = APIRouter()


def get_service(request: Request) -> OCRService:
    service: OCRService = request.app.state.service
    return service


Service = Annotated[OCRService, Depends(get_service)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "PDF, PNG, JPEG, TIFF, WebP, BMP or GIF (type read from the bytes).",
                        },
                        "pages": {
                            "type": "string",
                            "description": "1-based pages to read, e.g. `1-3,7` or `5-`. Default: all.",
                            "examples": ["1-3,7"],
                        },
                        "password": {"type": "string", "description": "Password of an encrypted PDF."},
                    },
                }
            }
        },
    }
}


@router.post(
    "/api/inference",
    response_model=DocumentResult,
    summary="OCR a document into markdown",
    openapi_extra=_UPLOAD_SCHEMA,
    responses=_errors(400, 408, 413, 415, 422, 502, 503, 504),
)
async def inference(request: Request, service: Service) -> DocumentResult:
    upload = await read_document(request, service)
    return await until_disconnect(
        request,
        service.recognize(
            upload.data,
            pages=upload.fields.get("pages"),
            password=upload.fields.get("password") or None,
            client=client_id(request),
        ),
    )


async def read_document(request: Request, service: OCRService) -> Upload:
    settings = service.settings
    return await read_upload(
        request,
        max_file_bytes=settings.max_file_bytes,
        max_field_bytes=settings.max_field_size_kb * 1024,
        timeout_s=settings.upload_timeout_s,
    )


T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects (after the body was read)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected("the client disconnected; its remaining pages were dropped")


class Limits(BaseModel):
    max_file_size_mb: float
    max_pages: int
    max_image_pixels: int
    max_new_tokens: int
    max_concurrent_pages: int


class Info(BaseModel):
    name: str = Field(examples=["LightOnOCR-Service"])
    version: str
    api_version: str = Field(examples=[API_VERSION])
    engine: Literal["huggingface", "vllm"]
    model: str = Field(examples=["lightonai/LightOnOCR-2-1B"])
    model_version: str = Field(examples=["lightonocr-2-1b"])
    device: str = Field(description="Device really used (after any fallback), or the vLLM server.")
    ready: bool
    sampling: dict[str, float]
    limits: Limits
    supported_types: list[str]


@router.get("/info", response_model=Info, summary="What this service runs and its limits")
async def info(service: Service) -> Info:
    settings = service.settings
    engine = service.engine.info()
    try:
        service.check_started()
        ready = True
    except ServiceUnavailable:
        ready = False
    return Info(
        name=settings.project_name,
        version=__version__,
        api_version=API_VERSION,
        engine=settings.model_source.value,
        model=settings.model_name,
        model_version=settings.model_version,
        device=engine.device,
        ready=ready,
        sampling={"temperature": settings.temperature, "top_p": settings.top_p},
        limits=Limits(
            max_file_size_mb=settings.max_file_size_mb,
            max_pages=settings.max_pages,
            max_image_pixels=settings.max_image_pixels,
            max_new_tokens=settings.max_new_tokens,
            max_concurrent_pages=settings.max_concurrent_pages,
        ),
        supported_types=["pdf", "png", "jpeg", "tiff", "webp", "bmp", "gif"],
    )


class Status(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health", response_model=Status, summary="Liveness: the process answers")
async def health() -> Status:
    return Status()


@router.get(
    "/ready",
    response_model=Status,
    summary="Readiness: the engine can serve pages now",
    responses=_errors(503),
)
async def ready(service: Service) -> Status | JSONResponse:
    await service.check_ready()
    return Status()
