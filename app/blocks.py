"""Split a page's markdown into typed blocks in reading order (markdown-it-py).

Each block keeps its markdown source, so a caller can re-assemble, index or
render pieces without re-parsing. HTML tables (the model writes many) count
as tables; a paragraph that is only an image placeholder counts as an image.
"""

from __future__ import annotations

import re
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.token import Token
from mdit_py_plugins.dollarmath import dollarmath_plugin

from app.results import Block, BlockType

_IMAGE_ONLY = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)[\d\s,]*$")  # -bbox checkpoints append coordinates
_OPEN_TO_TYPE: dict[str, BlockType] = {
    "heading_open": "heading",
    "paragraph_open": "paragraph",
    "bullet_list_open": "list",
    "ordered_list_open": "list",
    "table_open": "table",
    "blockquote_open": "paragraph",
}
_LEAF_TO_TYPE: dict[str, BlockType] = {
    "math_block": "math",
    "math_block_label": "math",
    "fence": "code",
    "code_block": "code",
}


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table").use(dollarmath_plugin, allow_space=True, double_inline=True)


def _source(lines: list[str], token: Token) -> str:
    if token.map is None:
        return token.content.strip()
    start, end = token.map
    return "\n".join(lines[start:end]).strip()


def parse_blocks(markdown: str, page: int) -> list[Block]:
    lines = markdown.splitlines()
    tokens = _parser().parse(markdown)
    blocks: list[Block] = []
    for token in tokens:
        if token.level != 0 or token.nesting == -1:
            continue
        text = _source(lines, token)
        if not text:
            continue
        kind: BlockType | None = _OPEN_TO_TYPE.get(token.type) or _LEAF_TO_TYPE.get(token.type)
        level: int | None = None
        if token.type == "html_block":
            kind = "table" if "<table" in text.lower() else "paragraph"
        elif token.type == "heading_open":
            level = int(token.tag[1:])
        elif kind == "paragraph" and _IMAGE_ONLY.match(text):
            kind = "image"
        if kind is None:  # hr and other separators carry no content
            continue
        blocks.append(Block(type=kind, page=page, text=text, level=level))
    return blocks
