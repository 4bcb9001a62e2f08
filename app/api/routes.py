"""Routes: inference, info, metrics and the two probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from app import __version__
from app.api.deps import Service, read_document, read_options, until_disconnect
from app.api.errors import WatchedSend, shutting_down
from app.api.openapi import error_responses, upload_schema
from app.api.security import client_id
from app.errors import ClientDisconnected, ServiceUnavailable
from app.events import ErrorEvent, ErrorInfo, Event
from app.intake import DocType
from app.jobs import JobRunner
from app.metrics import CONTENT_TYPE
from app.results import DocumentResult
from app.settings import short_model_name
from app.streaming import ndjson, server_sent, with_heartbeat

API_VERSION = "1.0"

log = logging.getLogger(__name__)

router = APIRouter()


_STREAM_FORMATS: dict[str, Callable[[Event], bytes]] = {
    "application/x-ndjson": ndjson,
    "text/event-stream": server_sent,
}

_STREAM_DOC = (
    "Send `Accept: application/x-ndjson` (one JSON object per line) or `Accept: text/event-stream` (SSE) to get "
    "events as pages finish instead of one JSON body: `start` {total, pages}, then per finished page (completion "
    "order) `page` {page, blocks} and `progress` {done, total}, and last `result` {result: DocumentResult} or `error` "
    "{error: {code, message}}; a `ping` (SSE: a `: ping` comment) after 15 s without another event keeps proxies "
    "from closing a quiet stream. Limits are checked before the stream starts, so a refused document still gets its "
    "4xx status."
)


@router.post(
    "/api/inference",
    response_model=DocumentResult,
    summary="OCR a document into markdown",
    description="Read every selected page and answer with the document's markdown, typed blocks and per-page "
    "details. " + _STREAM_DOC,
    openapi_extra=upload_schema(),
    responses={
        **error_responses(400, 401, 408, 413, 415, 422, 429, 500, 502, 503, 504),
        200: {
            "description": "The document, or a stream of events (see description).",
            "content": {"application/x-ndjson": {}, "text/event-stream": {}},
        },
    },
)
async def inference(request: Request, service: Service) -> Response:
    upload = await read_document(request, service)
    pages = upload.fields.get("pages")
    password = upload.fields.get("password") or None
    client = client_id(request)
    options = read_options(upload)
    chosen = stream_format(request.headers.get("accept", ""))
    if chosen is None:
        result = await until_disconnect(
            request.receive,
            service.recognize(upload.data, pages=pages, password=password, client=client, options=options),
        )
        # Encoded off the event loop: a long document's result is megabytes of JSON.
        return Response(await anyio.to_thread.run_sync(result.model_dump_json), media_type="application/json")
    media_type, encode = chosen
    resources = contextlib.AsyncExitStack()
    async with contextlib.AsyncExitStack() as on_error:
        on_error.push_async_callback(resources.aclose)
        admitted = await resources.enter_async_context(
            service.admit(upload.data, pages=pages, password=password, client=client, options=options)
        )
        on_error.pop_all()
    events = with_heartbeat(service.events(admitted))
    return EventStream(events, encode, media_type=media_type, on_close=resources.aclose)


def stream_format(accept: str) -> tuple[str, Callable[[Event], bytes]] | None:
    """The stream media type and encoder `Accept` asks for (NDJSON or SSE); None for neither."""
    for part in accept.split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in _STREAM_FORMATS:
            return media_type, _STREAM_FORMATS[media_type]
    return None


class EventStream(StreamingResponse):
    """Streams events and always releases the document, however the stream ends (even a disconnect)."""

    def __init__(
        self,
        events: AsyncGenerator[Event, None],
        encode: Callable[[Event], bytes],
        *,
        media_type: str,
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        self._events = events
        self._encode = encode
        self._on_close = on_close

        async def body() -> AsyncIterator[bytes]:
            async for event in events:
                yield encode(event)

        super().__init__(
            body(), media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        try:
            # Starlette notices a gone client only at the next write; watch for it so held pages are dropped now.
            await until_disconnect(receive, super().__call__(scope, receive, watched))
        except ClientDisconnected:
            pass
        except asyncio.CancelledError:
            if not watched.started:
                raise  # ShutdownGuard answers the JSON 503
            # The server stops past its grace period (see ShutdownGuard): end the stream the documented way.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.warning("stream %s cut by the server's shutdown (past its grace period)", scope["path"])
            event = ErrorEvent(error=ErrorInfo.of(shutting_down(scope)))
            await send({"type": "http.response.body", "body": self._encode(event), "more_body": False})
        finally:
            await self._events.aclose()  # cancels pages not started
            await self._on_close()


class Limits(BaseModel):
    max_file_size_mb: float = Field(description="Largest upload in MiB (MAX_FILE_SIZE_MB).", examples=[10.0])
    max_pages: int = Field(description="Most pages per request after selection (MAX_PAGES).", examples=[100])
    max_image_pixels: int = Field(description="Largest image in pixels (MAX_IMAGE_PIXELS).", examples=[80000000])
    max_new_tokens: int = Field(description="Generation bound per page (MAX_NEW_TOKENS).", examples=[4096])
    max_concurrent_pages: int = Field(
        description="Pages in flight to vLLM across requests (MAX_CONCURRENT_PAGES).", examples=[64]
    )


class Endpoint(BaseModel):
    url: str = Field(description="The vLLM server's base URL, without credentials.", examples=["http://vllm-0:8001/v1"])
    state: Literal["healthy", "down"] = Field(
        description="`healthy`: in the rotation; `down`: it failed and is probed until it serves MODEL_NAME again."
    )
    capacity: int = Field(description="Pages it may hold in flight (MAX_CONCURRENT_PAGES or its #capacity=N).")
    in_flight: int = Field(description="Pages at it now.")
    pages: int = Field(description="Pages it answered since start.")
    errors: int = Field(description="Failed attempts at it (connection errors, 5xx, 429, timeouts).")


class ModelProfile(BaseModel):
    """The profile table's row for MODEL_NAME (app/profiles.py), with the settings that override it applied."""

    name: str = Field(
        description="The checkpoint's row (`fallback` for an unknown name).", examples=["LightOnOCR-2-1B"]
    )
    known: bool = Field(description="False when MODEL_NAME is not in the table and LightOn's fallback is used.")
    generation: int = Field(description="LightOnOCR generation (1, 2 or 3).", examples=[2])
    architecture: str = Field(description="`lightonocr` (Pixtral + Qwen3) or `qwen3_5` (Qwen3.5-VL).")
    longest_edge: int = Field(description="Longest edge of the page images sent, in px.", examples=[1540])
    temperature: float = Field(description="Temperature of first attempts.", examples=[0.2])
    top_p: float = Field(description="top_p of every attempt.", examples=[0.9])
    supports_grounding: bool = Field(description="Whether mode=grounding is available (generation 3).")
    emits_picture_boxes: bool = Field(description="Whether the model writes each picture's box (the -bbox ones).")
    extra_request_fields: dict[str, Any] = Field(
        description="Fields added to every chat request.",
        examples=[{"chat_template_kwargs": {"enable_thinking": False}}],
    )
    overridden_by: list[str] = Field(
        description="Settings that replace the row's values (TEMPERATURE, TOP_P, RENDER_LONGEST_EDGE).", examples=[[]]
    )


class Info(BaseModel):
    name: str = Field(description="Service name (PROJECT_NAME).", examples=["LightOnOCR-Service"])
    version: str = Field(description="Version of this service.", examples=["0.1.0"])
    api_version: str = Field(description="Version of the HTTP API.", examples=[API_VERSION])
    engine: Literal["huggingface", "vllm", "openai"] = Field(description="Engine running the model (MODEL_SOURCE).")
    model: str = Field(
        description="Model id or checkpoint (MODEL_NAME, or the one an OpenAI-compatible server lists).",
        examples=["lightonai/LightOnOCR-2-1B"],
    )
    model_version: str = Field(description="Short model name, as in results.", examples=["lightonocr-2-1b"])
    device: str = Field(description="Device really used (after any fallback), or the vLLM server.")
    ready: bool = Field(description="Whether a page sent now would be served: the same check as /ready.")
    sampling: dict[str, float] = Field(
        description="Sampling of first attempts.", examples=[{"temperature": 0.2, "top_p": 0.9}]
    )
    limits: Limits = Field(description="Limits a request must stay within.")
    profile: ModelProfile = Field(description="The model's profile in use (README, 'Supported checkpoints').")
    endpoints: list[Endpoint] = Field(
        default_factory=list, description="The vLLM servers of VLLM_BASE_URL and their state (empty for huggingface)."
    )
    supported_types: list[str] = Field(
        description="Document types accepted (read from the bytes).", examples=[["pdf", "png", "jpeg"]]
    )


@router.get(
    "/info",
    response_model=Info,
    summary="What this service runs and its limits",
    description="Engine, model, device really used, API version, sampling and limits. Needs a key when keys are on.",
    responses=error_responses(401, 500),
)
async def info(request: Request, service: Service) -> Info:
    settings = service.settings
    engine = service.engine.info()
    try:
        await _check_ready(request, service)  # the same answer as /ready, not just "the engine has started"
        ready = True
    except ServiceUnavailable:
        ready = False
    return Info(
        name=settings.project_name,
        version=__version__,
        api_version=API_VERSION,
        engine=settings.model_source.value,
        model=engine.model,
        model_version=short_model_name(engine.model),
        device=engine.device,
        ready=ready,
        sampling={"temperature": service.profile.temperature, "top_p": service.profile.top_p},
        profile=ModelProfile(**service.profile.describe()),
        limits=Limits(
            max_file_size_mb=settings.max_file_size_mb,
            max_pages=settings.max_pages,
            max_image_pixels=settings.max_image_pixels,
            max_new_tokens=settings.max_new_tokens,
            max_concurrent_pages=settings.max_concurrent_pages,
        ),
        supported_types=[doc_type.value for doc_type in DocType],
        endpoints=[
            Endpoint(
                url=e.url,
                state="healthy" if e.healthy else "down",
                capacity=e.capacity,
                in_flight=e.in_flight,
                pages=e.pages,
                errors=e.errors,
            )
            for e in engine.endpoints
        ],
    )


class Status(BaseModel):
    status: Literal["ok"] = Field(default="ok", description="Always `ok`; failures use the error shape.")


@router.get(
    "/health",
    response_model=Status,
    summary="Liveness: the process answers",
    description="200 while the process answers, even while the model loads. Never needs a key.",
)
async def health() -> Status:
    return Status()


@router.get(
    "/ready",
    response_model=Status,
    summary="Readiness: the engine can serve pages now",
    description="200 when a page sent now would be served; 503 with `Retry-After` while the model loads, when it "
    "failed to load, when vLLM is unreachable or serves another model, or when the job runner stopped. Never needs "
    "a key.",
    responses=error_responses(503),
)
async def ready(request: Request, service: Service) -> Status | JSONResponse:
    await _check_ready(request, service)
    return Status()


async def _check_ready(request: Request, service: Service) -> None:
    """Readiness, for /ready and /info alike: the engine serves and the job runner is alive."""
    await service.check_ready()
    jobs: JobRunner | None = getattr(request.app.state, "jobs", None)
    if jobs is not None:
        jobs.check_alive()
        await jobs.check_store()  # PostgreSQL lost: 503 store_unavailable


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests by route and status, pages by status, page latency and tokens, retries, repetition "
    "loops, bytes received, queue depth and engine pages in flight, in Prometheus' text format. Needs a key "
    "when keys are on.",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}},
        **error_responses(401),
    },
)
async def prometheus_metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
