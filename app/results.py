"""Result types shared by the engines, the pipeline, the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]
BlockType = Literal["heading", "paragraph", "list", "table", "math", "image", "code"]


@dataclass(frozen=True, slots=True)
class Generation:
    """What an engine returns for one page, before post-processing."""

    text: str
    finish_reason: FinishReason
    tokens: int


class PageResult(BaseModel):
    page: int = Field(description="1-based page number in the document.", examples=[1])
    text: str = Field(description="The page's markdown.")
    width: int = Field(description="Width in pixels of the image sent to the model.")
    height: int = Field(description="Height in pixels of the image sent to the model.")
    finish_reason: FinishReason = Field(
        description="`stop`: the model ended the page; `length`: it hit MAX_NEW_TOKENS."
    )
    tokens: int = Field(description="Tokens generated for this page.")
    seconds: float = Field(description="Wall time for this page: rendering and recognition.")


class Block(BaseModel):
    type: BlockType
    page: int = Field(description="1-based page the block comes from.")
    text: str = Field(description="The block's markdown source.")
    level: int | None = Field(default=None, description="Heading level (1-6); null otherwise.")


class DocumentResult(BaseModel):
    text: str = Field(description="The whole document's markdown, pages in order.")
    blocks: list[Block] = Field(description="Typed blocks in reading order.")
    model_version: str = Field(examples=["lightonocr-2-1b"])
    pages: list[PageResult]
