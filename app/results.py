"""Result types shared by the engines, the pipeline, the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]
PageStatus = Literal["ok", "retried", "truncated", "repetitive", "failed"]
DocumentStatus = Literal["ok", "partial"]
BlockType = Literal["heading", "paragraph", "list", "table", "math", "image", "code"]
# How the model is asked to read a page: `plain` markdown, or `grounding` (generation-3 models: a labelled
# box before every layout block, see app/grounding.py).
Mode = Literal["plain", "grounding"]
# `none`: pictures are referenced by name (`page_N_image_K.png`); `inline`: each picture block carries its crop.
ImagesOption = Literal["none", "inline"]
# The grounding labels LightOnOCR-3 writes (a block may carry another label: kept as written, and warned about).
LABELS: tuple[str, ...] = (
    "title", "section", "text", "list", "caption", "footnote", "aside_text", "header", "footer", "page_number",
    "table", "chart", "formula", "code", "image",
)  # fmt: skip
# Dropped from a page's `text` by `drop_headers_footers` (LightOn's HEADER_FOOTER): the blocks stay in `blocks`.
HEADER_FOOTER_LABELS = frozenset({"header", "footer", "page_number", "footnote"})


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


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """How to read a document's pages, as the caller asked (the `mode`, `drop_headers_footers`, `images` fields)."""

    mode: Mode = "plain"
    drop_headers_footers: bool = False
    images: ImagesOption = "none"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "drop_headers_footers": self.drop_headers_footers, "images": self.images}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReadOptions:
        """Options as stored with a job (`to_dict`); missing keys (a job from before options) take the defaults."""
        data = data or {}
        return cls(
            mode=data.get("mode", "plain"),
            drop_headers_footers=bool(data.get("drop_headers_footers", False)),
            images=data.get("images", "none"),
        )


def _absent(value: object) -> bool:
    """Grounding-only fields are left out of a block's JSON when they have nothing to say (plain mode)."""
    return value is None or value == []


class Box(BaseModel):
    bbox: list[int] = Field(
        description="`[x1, y1, x2, y2]` in pixels of the page image the model saw (`width` x `height`).",
        examples=[[368, 139, 823, 795]],
    )
    bbox_norm: list[int] = Field(
        description="`[x1, y1, x2, y2]` as the model wrote it: 0-1000 of the page image on both axes.",
        examples=[[309, 90, 691, 516]],
    )


class Block(BaseModel):
    type: BlockType = Field(description="Kind of block, from the page's markdown.")
    page: int = Field(description="1-based page the block comes from.")
    text: str = Field(description="The block's markdown source.")
    level: int | None = Field(default=None, description="Heading level (1-6); null otherwise.")
    label: str | None = Field(
        default=None,
        exclude_if=_absent,
        description="Grounding mode: the model's layout label (" + ", ".join(LABELS) + "); an unknown label is kept "
        "as written and the page has a warning. Absent in plain mode.",
        examples=["text"],
    )
    bbox: list[int] | None = Field(
        default=None,
        exclude_if=_absent,
        description="`[x1, y1, x2, y2]` in pixels of the page image the model saw. Absent when the model gave no box "
        "or one that cannot be trusted (see the page's `warnings`).",
        examples=[[368, 139, 823, 795]],
    )
    bbox_norm: list[int] | None = Field(
        default=None,
        exclude_if=_absent,
        description="The same box as the model wrote it: 0-1000 of the page image on both axes.",
        examples=[[309, 90, 691, 516]],
    )
    continuations: list[Box] = Field(
        default_factory=list,
        exclude_if=_absent,
        description="Grounding mode: the boxes of the parts the model marked as continuing this block (`text+`, "
        "e.g. the paragraph's end in the next column); their text is merged into `text`.",
    )
    picture: int | None = Field(
        default=None,
        exclude_if=_absent,
        description="For a picture (a grounding `image` block, or a `-bbox` picture with its coordinates): its "
        "1-based number on the page, as in its markdown reference `page_N_image_K.png` and in "
        "GET /api/jobs/{id}/pages/{n}/images/{k} (when it has a `bbox`).",
        examples=[1],
    )
    image: str | None = Field(
        default=None,
        exclude_if=_absent,
        description="With `images=inline`: the picture cropped from the page image (5 px margin), a PNG data URL.",
    )


class PageWarning(BaseModel):
    code: str = Field(
        description="`bad_box` (coordinates out of 0-1000, inverted or empty: the block is kept without a box), "
        "`unknown_label` (a label outside the known set: kept as written), `cut_marker` (the output ended inside a "
        "marker, e.g. at MAX_NEW_TOKENS: the fragment is dropped), `unmarked_text` (grounding text before the first "
        "marker: kept as blocks without label or box).",
        examples=["bad_box"],
    )
    message: str = Field(description="What was wrong, for people.")


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
    warnings: list[PageWarning] = Field(
        default_factory=list,
        exclude_if=_absent,
        description="What could not be trusted in the model's markers (boxes, labels); the page is kept. Absent "
        "when there is none.",
    )


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
