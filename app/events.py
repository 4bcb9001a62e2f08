"""A document's recognition as typed events: one set for the server's streams, the CLI and the jobs API.

In this order:
- `start` {total, pages}: the pages that will be read (1-based);
- per finished page, in completion order (not page order): `page` {page: PageResult, blocks}, then `progress`
  {done, total};
- last, `result` {result: DocumentResult} or `error` {error: {code, message, details?}} (the JSON API's shape).

`ping` events carry nothing: streams send one when nothing else was sent for a while, so proxies keep the
connection open (see `app/streaming.py`); readers skip them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, TypeAdapter, model_serializer

from app.errors import OCRError
from app.results import Block, DocumentResult, PageResult


class ErrorInfo(BaseModel):
    """The error shape of the JSON API: `details` only when the error has any."""

    code: str
    message: str
    details: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if not body.get("details"):
            body.pop("details", None)
        return body

    @classmethod
    def of(cls, exc: OCRError) -> ErrorInfo:
        return cls.model_validate(exc.to_dict())


class StartEvent(BaseModel):
    event: Literal["start"] = "start"
    total: int
    pages: list[int]


class PageEvent(BaseModel):
    event: Literal["page"] = "page"
    page: PageResult
    blocks: list[Block] = Field(default_factory=list, description="The page's blocks, as in the result's `blocks`.")


class ProgressEvent(BaseModel):
    event: Literal["progress"] = "progress"
    done: int
    total: int


class ResultEvent(BaseModel):
    event: Literal["result"] = "result"
    result: DocumentResult


class ErrorEvent(BaseModel):
    event: Literal["error"] = "error"
    error: ErrorInfo


class PingEvent(BaseModel):
    event: Literal["ping"] = "ping"


Event = Annotated[
    StartEvent | PageEvent | ProgressEvent | ResultEvent | ErrorEvent | PingEvent, Field(discriminator="event")
]
EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event:
    """One event from its JSON (an NDJSON line or an SSE `data:` field); raises `ValueError` when it is none."""
    return EVENT.validate_json(line)
