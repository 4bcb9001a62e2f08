"""The web page and its one helper endpoint.

`GET /` is the page (open without an API key, so it can load and ask for one);
its assets are mounted under `/static` by `install_web`. `POST /web/render`
answers the PNG of each selected page exactly as the model sees it: the
service's own intake (`OCRService.open` + `Document.render`) encoded with
`encode_png`, the bytes the vLLM engine sends. It is bounded by the same limits
as `/api/inference` (file size, MAX_PAGES, pixel count) and needs the API key
like every other route.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from app.api.deps import Service, read_document, until_disconnect
from app.imaging import page_png, png_data_url
from app.intake import Document
from app.service import OCRService

STATIC_DIR = Path(__file__).parent / "static"

# KaTeX writes inline `style` attributes, hence 'unsafe-inline' for styles only. Scripts
# come from this origin alone, so markup that slips past the sanitizer still cannot run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Rendering for the page is a convenience: at most this many page renders run at once
# across all requests, so it never crowds the worker threads that inference needs.
RENDER_THREADS = 2

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


class RenderedPage(BaseModel):
    page: int = Field(description="1-based page number.")
    width: int
    height: int
    image: str = Field(description="The page as the model saw it, a PNG data URL.")


class RenderedPages(BaseModel):
    pages: list[RenderedPage]


@router.post("/web/render", response_model=RenderedPages)
async def render(request: Request, service: Service) -> RenderedPages:
    """The selected pages as PNG data URLs (multipart `file`, optional `pages`, `password`)."""
    upload = await read_document(request, service)
    limiter: anyio.CapacityLimiter = request.app.state.web_render_limiter
    return await until_disconnect(
        request.receive,
        _render_pages(
            service,
            upload.data,
            pages=upload.fields.get("pages"),
            password=upload.fields.get("password") or None,
            limiter=limiter,
        ),
    )


async def _render_pages(
    service: OCRService, data: bytes, *, pages: str | None, password: str | None, limiter: anyio.CapacityLimiter
) -> RenderedPages:
    async with service.opened(data, pages=pages, password=password) as (document, indices):
        rendered = []
        for index in indices:  # one page at a time: memory holds one raw page, not the document
            url, (width, height) = await anyio.to_thread.run_sync(_page_data_url, document, index, limiter=limiter)
            rendered.append(RenderedPage(page=index + 1, width=width, height=height, image=url))
        return RenderedPages(pages=rendered)


def _page_data_url(document: Document, index: int) -> tuple[str, tuple[int, int]]:
    """Render, PNG-encode and base64 one page, all in the worker thread (megabytes: never on the event loop)."""
    png, size = page_png(document, index)
    return png_data_url(png), size
