"""Result types shared by the engines, the pipeline, the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]
PageStatus = Literal["ok", "retried", "truncated", "repetitive", "failed"]
DocumentStatus = Literal["ok", "partial"]
BlockType = Literal["heading", "paragraph", "list", "table", "math", "image", "code"]


# Shown in /docs.
_DOCUMENT_EXAMPLE: dict[str, Any] = {
    "status": "ok",
    "text": "# Annual report\n\nRevenue grew 12%.",
    "blocks": [
        {"type": "heading", "page": 1, "text": "# Annual report", "level": 1},
        {"type": "paragraph", "page": 1, "text": "Revenue grew 12%.", "level": None},
    ],
    "model_version": "lightonocr-2-1b",
    "pages": [
        {
            "page": 1,
            "text": "# Annual report\n\nRevenue grew 12%.",
            "width": 1190,
            "height": 1540,
            "finish_reason": "stop",
            "tokens": 412,
            "seconds": 1.83,
            "status": "ok",
            "attempts": 1,
            "error": None,
        }
    ],
    "failed_pages": [],
}


@dataclass(frozen=True, slots=True)
class Generation:
    """What an engine returns for one page, before post-processing."""

    text: str
    finish_reason: FinishReason
    tokens: int


class Block(BaseModel):
    type: BlockType = Field(description="Kind of block, from the page's markdown.")
    page: int = Field(description="1-based page the block comes from.")
    text: str = Field(description="The block's markdown source.")
    level: int | None = Field(default=None, description="Heading level (1-6); null otherwise.")


class PageError(BaseModel):
    code: str = Field(description="Stable error code, as in the error table.", examples=["engine_timeout"])
    message: str = Field(description="What went wrong, for people.")
    details: dict[str, Any] | None = Field(
        default=None,
        description="Machine-readable facts about the error, as in the error shape (e.g. `upstream_status`).",
    )


class PageResult(BaseModel):
    page: int = Field(description="1-based page number in the document.", examples=[1])
    text: str = Field(description="The page's markdown (empty when the page failed).")
    width: int | None = Field(description="Width in pixels of the image sent to the model (null if never rendered).")
    height: int | None = Field(description="Height in pixels of the image sent to the model.")
    finish_reason: FinishReason | None = Field(
        description="`stop`: the model ended the page; `length`: it hit MAX_NEW_TOKENS; null when it failed."
    )
    tokens: int = Field(description="Tokens generated for the kept attempt.")
    seconds: float = Field(description="Wall time for this page: rendering, queueing and every attempt.")
    status: PageStatus = Field(
        description="`ok`; `retried` (clean after a retry); `truncated` (every attempt hit the token limit); "
        "`repetitive` (the kept attempt loops); `failed` (no text, see `error`)."
    )
    attempts: int = Field(description="Generations run for this page (1 + retries).")
    error: PageError | None = Field(default=None, description="Why the page failed.")


@dataclass(frozen=True, slots=True)
class FinishedPage:
    """A page as the core passes it on: its result and its blocks, parsed once off the event loop when it ended."""

    result: PageResult
    blocks: list[Block]

    @property
    def page(self) -> int:
        return self.result.page


class DocumentResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_DOCUMENT_EXAMPLE]})

    status: DocumentStatus = Field(description="`ok`, or `partial` when some page is not `ok`/`retried`.")
    text: str = Field(description="The whole document's markdown, pages in order.")
    blocks: list[Block] = Field(description="Typed blocks in reading order.")
    model_version: str = Field(description="Short name of the model that read the pages.", examples=["lightonocr-2-1b"])
    pages: list[PageResult] = Field(description="Every selected page, in page order.")
    failed_pages: list[int] = Field(default_factory=list, description="Pages with status `failed`.")
