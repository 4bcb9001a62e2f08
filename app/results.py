"""Result types shared by the engines, the pipeline, the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr

from app.errors import OCRError

FinishReason = Literal["stop", "length"]
PageStatus = Literal["ok", "retried", "truncated", "repetitive", "failed"]
DocumentStatus = Literal["ok", "partial"]
BlockType = Literal["heading", "paragraph", "list", "table", "math", "image", "code"]


@dataclass(frozen=True, slots=True)
class Generation:
    """What an engine returns for one page, before post-processing."""

    text: str
    finish_reason: FinishReason
    tokens: int


class PageError(BaseModel):
    code: str = Field(examples=["engine_timeout"])
    message: str


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
    # The failure itself, kept in process so a wholly failed document re-raises its real error.
    _exception: OCRError | None = PrivateAttr(default=None)

    @property
    def exception(self) -> OCRError | None:
        return self._exception

    @exception.setter
    def exception(self, value: OCRError | None) -> None:
        self._exception = value


class Block(BaseModel):
    type: BlockType
    page: int = Field(description="1-based page the block comes from.")
    text: str = Field(description="The block's markdown source.")
    level: int | None = Field(default=None, description="Heading level (1-6); null otherwise.")


class DocumentResult(BaseModel):
    status: DocumentStatus = Field(description="`ok`, or `partial` when some page is not `ok`/`retried`.")
    text: str = Field(description="The whole document's markdown, pages in order.")
    blocks: list[Block] = Field(description="Typed blocks in reading order.")
    model_version: str = Field(examples=["lightonocr-2-1b"])
    pages: list[PageResult]
    failed_pages: list[int] = Field(default_factory=list, description="Pages with status `failed`.")
