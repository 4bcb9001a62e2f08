"""Request helpers shared by the API's routes and the web page: the service dependency, reading the
upload within the limits, and cancelling work when the client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from starlette.types import Receive

from app.api.upload import Upload, read_upload
from app.errors import ClientDisconnected, InvalidOption
from app.results import ReadOptions
from app.service import OCRService


def get_service(request: Request) -> OCRService:
    service: OCRService = request.app.state.service
    return service


Service = Annotated[OCRService, Depends(get_service)]


async def read_document(request: Request, service: OCRService) -> Upload:
    settings = service.settings
    return await read_upload(
        request,
        max_file_bytes=settings.max_file_bytes,
        max_field_bytes=settings.max_field_size_kb * 1024,
        timeout_s=settings.upload_timeout_s,
        idle_timeout_s=settings.upload_idle_timeout_s,
    )


_CHOICES = {"mode": ("plain", "grounding"), "images": ("none", "inline")}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def read_options(upload: Upload) -> ReadOptions:
    """The reading options among the form fields (`mode`, `drop_headers_footers`, `images`); defaults when absent."""
    fields = upload.fields
    for name, accepted in _CHOICES.items():
        value = fields.get(name)
        if value is not None and value not in accepted:
            raise InvalidOption(
                f"`{name}` must be one of {', '.join(accepted)}; got {value[:40]!r}",
                field=name,
                accepted=list(accepted),
            )
    drop = fields.get("drop_headers_footers", "").strip().lower()
    if drop not in _TRUE + _FALSE:
        raise InvalidOption(
            f"`drop_headers_footers` must be true or false; got {drop[:40]!r}",
            field="drop_headers_footers",
            accepted=["true", "false"],
        )
    return ReadOptions(
        mode="grounding" if fields.get("mode") == "grounding" else "plain",
        drop_headers_footers=drop in _TRUE,
        images="inline" if fields.get("images") == "inline" else "none",
    )


T = TypeVar("T")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects (call after the body was read)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        # Let the work unwind before the caller's own cleanup runs (it may release what the work still uses).
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected("the client disconnected; its remaining pages were dropped")
