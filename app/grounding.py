"""Boxes in the model's output: grounding markers (generation 3) and picture boxes (the `-bbox` checkpoints).

Grounding mode (LightOnOCR-3, the user turn holds the image and the text `grounding`): the model writes a
marker before every layout block, and the block's text runs until the next marker::

    ![image](309,90,691,516) Model architecture diagram ...
    ![title](113,608,263,623) ## 2.2 LightOnOCR-1
    ![text+](112,640,882,698) ... the end of a paragraph that began in the previous column

Coordinates are 0-1000 of the page image on both axes; a label ending in `+` continues the previous block.
The `-bbox` checkpoints write plain markdown but follow each embedded picture with its box:
`![image](image_3.png)120,40,880,410` (space optional).

Everything here turns that output into `Block`s with pixel boxes and a page text without markers. What the
model got wrong (a box out of range or inverted, an unknown label, a marker cut off by MAX_NEW_TOKENS) never
fails the page: the block keeps what can be trusted and the page gets a `PageWarning`. Pure functions, no
I/O: the service runs them in a worker thread when a page ends.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from PIL import Image

from app.blocks import parse_blocks
from app.imaging import png_data_url
from app.results import HEADER_FOOTER_LABELS, LABELS, Block, BlockType, Box, PageWarning

PICTURE_PAD = 5  # pixels around a cropped picture, as LightOn's demo crops them

# A marker as the model writes it, with anything number-like inside the brackets, so that a box with the wrong
# count of numbers (or a negative one) is still recognised as a marker and reported, not left in the text.
_MARKER = re.compile(r"!\[([A-Za-z_][\w-]*?)(\+?)\]\(([-\d\s,.]*\d[-\d\s,.]*)\)[ \t]*")
# An unfinished marker at the very end of the output (the generation stopped inside it).
_CUT_MARKER = re.compile(r"!\[(?:[A-Za-z_][\w-]*)?\+?(?:\](?:\([-\d\s,.]*)?)?\s*\Z")
# A `-bbox` picture: a markdown image followed by numbers (its box, normally four).
_PICTURE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]+)\)[ \t]*(-?\d+(?:[ \t]*,[ \t]*-?\d+)+)")
_HEADING = re.compile(r"^(#{1,6})\s")

_LABEL_TYPE: dict[str, BlockType] = {
    "title": "heading",
    "section": "heading",
    "list": "list",
    "table": "table",
    "chart": "table",  # its data, as an HTML table
    "formula": "math",
    "code": "code",
    "image": "image",
}


@dataclass
class ParsedPage:
    """A page's output read: the markdown to show (no markers), its blocks, and what could not be trusted."""

    text: str
    blocks: list[Block]
    warnings: list[PageWarning] = field(default_factory=list)


def picture_name(page: int, number: int) -> str:
    """How the page's markdown refers to picture `number` (1-based) of page `page`."""
    return f"page_{page}_image_{number}.png"


def _check_box(numbers: str, width: int, height: int) -> tuple[Box | None, str | None]:
    """The box the model wrote as a `Box` in pixels, or None and why it cannot be trusted."""
    parts = [part.strip() for part in numbers.split(",")]
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        return None, f"coordinates `{numbers.strip()}` are not four whole numbers"
    x1, y1, x2, y2 = (int(part) for part in parts)
    if max(x1, y1, x2, y2) > 1000:
        return None, f"coordinates `{x1},{y1},{x2},{y2}` are outside 0-1000"
    if x1 >= x2 or y1 >= y2:
        return None, f"coordinates `{x1},{y1},{x2},{y2}` are inverted or empty"
    pixels = [round(x1 * width / 1000), round(y1 * height / 1000), round(x2 * width / 1000), round(y2 * height / 1000)]
    return Box(bbox=pixels, bbox_norm=[x1, y1, x2, y2]), None


def _box_fields(box: Box | None) -> dict[str, list[int] | None]:
    return {"bbox": box.bbox if box else None, "bbox_norm": box.bbox_norm if box else None}


def _heading_level(text: str) -> int | None:
    match = _HEADING.match(text)
    return len(match.group(1)) if match else None


def read_grounding(raw: str, page: int, width: int, height: int, *, drop_headers_footers: bool = False) -> ParsedPage:
    """Blocks from grounding output; `width` x `height` is the page image the model saw.

    `text` joins the blocks' markdown (without `header`, `footer`, `page_number` and `footnote` blocks when
    `drop_headers_footers`); `blocks` always holds every block.
    """
    warnings: list[PageWarning] = []
    cut = _CUT_MARKER.search(raw)
    if cut is not None and not _MARKER.match(raw, cut.start()):
        fragment = raw[cut.start() :].strip()
        warnings.append(
            PageWarning(code="cut_marker", message=f"the output ends inside a marker (`{fragment}`); it was dropped")
        )
        raw = raw[: cut.start()]
    markers = list(_MARKER.finditer(raw))
    blocks: list[Block] = []
    kept: list[bool] = []  # per block: whether it goes into the page's text
    head = raw[: markers[0].start()] if markers else raw
    if head.strip():
        # Text before any marker has no label or box: kept as plain blocks.
        warnings.append(PageWarning(code="unmarked_text", message="text before the first marker has no label or box"))
        for block in parse_blocks(head.strip(), page):
            blocks.append(block)
            kept.append(True)
    pictures = 0
    for i, marker in enumerate(markers):
        label, plus, numbers = marker.group(1), marker.group(2) == "+", marker.group(3)
        end = markers[i + 1].start() if i + 1 < len(markers) else len(raw)
        body = raw[marker.end() : end].strip()
        box, problem = _check_box(numbers, width, height)
        where = f"block {len(blocks) + (0 if plus and blocks else 1)} (`{label}{marker.group(2)}`)"
        if problem is not None:
            warnings.append(PageWarning(code="bad_box", message=f"{where}: {problem}; kept without a box"))
        if label not in LABELS:
            warnings.append(PageWarning(code="unknown_label", message=f"{where}: unknown label `{label}`; kept as is"))
        if plus and blocks:
            previous = blocks[-1]
            joined = f"{previous.text} {body}" if previous.text and body else previous.text or body
            continuations = [*previous.continuations, box] if box is not None else previous.continuations
            blocks[-1] = previous.model_copy(update={"text": joined, "continuations": continuations})
            continue
        kind = _LABEL_TYPE.get(label, "paragraph")
        picture: int | None = None
        if kind == "image":
            pictures += 1
            picture = pictures
            reference = f"![image]({picture_name(page, picture)})"
            body = f"{reference}\n\n{body}" if body else reference
        blocks.append(
            Block(
                type=kind,
                page=page,
                text=body,
                level=_heading_level(body) if kind == "heading" else None,
                label=label,
                picture=picture,
                **_box_fields(box),
            )
        )
        kept.append(not (drop_headers_footers and label in HEADER_FOOTER_LABELS))
    text = "\n\n".join(block.text for block, keep in zip(blocks, kept, strict=True) if keep and block.text)
    return ParsedPage(text=text, blocks=blocks, warnings=warnings)


def read_plain(markdown: str, page: int, width: int, height: int) -> ParsedPage:
    """Blocks from plain markdown; each `-bbox` picture box becomes an `image` block with its box.

    The coordinates leave the markdown: the K-th picture followed by a box is referred to as
    `page_N_image_K.png` (`picture_name`), even when its box cannot be trusted (then it has no `bbox`).
    """
    warnings: list[PageWarning] = []
    pictures: dict[str, tuple[int, Box | None]] = {}  # reference -> (picture number, box)

    def rewrite(match: re.Match[str]) -> str:
        alt, name, numbers = match.group(1), match.group(2), match.group(3)
        box, problem = _check_box(numbers, width, height)
        number = len(pictures) + 1
        if box is None:
            warnings.append(
                PageWarning(code="bad_box", message=f"picture {number} (`{name}`): {problem}; kept without a box")
            )
        reference = picture_name(page, number)
        pictures[reference] = (number, box)
        return f"![{alt}]({reference})"

    text = _PICTURE.sub(rewrite, markdown)
    blocks: list[Block] = []
    for block in parse_blocks(text, page):
        references = [reference for reference in pictures if f"]({reference})" in block.text]
        if block.type == "image" and len(references) == 1:
            number, box = pictures[references[0]]
            blocks.append(block.model_copy(update={**_box_fields(box), "picture": number}))
            continue
        blocks.append(block)
        # A picture among other content (a paragraph, a table cell) still gets its own block, just after.
        for reference in references:
            number, box = pictures[reference]
            blocks.append(
                Block(type="image", page=page, text=f"![image]({reference})", picture=number, **_box_fields(box))
            )
    return ParsedPage(text=text, blocks=blocks, warnings=warnings)


def crop_box(bbox: list[int], width: int, height: int, pad: int = PICTURE_PAD) -> tuple[int, int, int, int]:
    """The region cropped for a picture: its box plus `pad` pixels, within the page."""
    x1, y1, x2, y2 = bbox
    return max(0, x1 - pad), max(0, y1 - pad), min(width, x2 + pad), min(height, y2 + pad)


def crop_picture(image: Image.Image, bbox: list[int]) -> Image.Image:
    """The picture at `bbox` (pixels of `image`, the page the model saw), with LightOn's 5 px margin."""
    return image.crop(crop_box(bbox, image.width, image.height))


def picture_png(image: Image.Image, bbox: list[int]) -> bytes:
    buffer = io.BytesIO()
    crop_picture(image, bbox).save(buffer, format="PNG")
    return buffer.getvalue()


def inline_pictures(blocks: list[Block], image: Image.Image) -> list[Block]:
    """`blocks` with every boxed picture's crop as a PNG data URL in `image` (`images=inline`)."""
    return [
        block.model_copy(update={"image": png_data_url(picture_png(image, block.bbox))})
        if block.picture is not None and block.bbox is not None
        else block
        for block in blocks
    ]
