"""A document's recognition as a stream of events, for callers that want pages as they finish.

Events (dicts, JSON-ready), in this order:
- `{"event": "start", "total": N, "pages": [1, 2, ...]}`
- per finished page, in completion order (not page order):
  `{"event": "page", "page": {PageResult}}` then `{"event": "progress", "done": d, "total": N}`
- last, either `{"event": "result", "result": {DocumentResult}}`
  or `{"event": "error", "error": {"code", "message", "details"?}}` (same shape as the JSON API).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from app.errors import OCRError, RequestTimeout
from app.results import PageResult
from app.service import Job, OCRService

Event = dict[str, Any]


async def document_events(service: OCRService, job: Job) -> AsyncGenerator[Event, None]:
    yield {"event": "start", "total": job.total, "pages": [index + 1 for index in job.pages]}
    done: list[PageResult] = []
    timeout = service.settings.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            pages = service.iter_pages(job)
            try:
                async for page in pages:
                    done.append(page)
                    yield {"event": "page", "page": page.model_dump(mode="json")}
                    yield {"event": "progress", "done": len(done), "total": job.total}
            finally:
                await pages.aclose()
        result = service.assemble(done)
    except TimeoutError:
        error: OCRError = RequestTimeout(
            f"the document was not finished within {timeout:g}s (REQUEST_TIMEOUT_S): "
            f"{len(done)} of {job.total} pages done",
            pages_done=len(done),
            pages_total=job.total,
        )
        yield {"event": "error", "error": error.to_dict()}
        return
    except OCRError as exc:
        yield {"event": "error", "error": exc.to_dict()}
        return
    yield {"event": "result", "result": result.model_dump(mode="json")}


def ndjson(event: Event) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


def server_sent(event: Event) -> bytes:
    return f"event: {event['event']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
