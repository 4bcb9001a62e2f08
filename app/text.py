"""Markdown to plain text, the one converter every face uses (CLI `-f txt`, jobs `?format=txt`).

The page's markdown is rendered with markdown-it-py (raw HTML kept, so the
model's HTML tables read like pipe tables), then reduced to its text: blocks end
with a blank line, table rows with a newline and cells with a tab; list items
keep their marker (`- ` or `N. `); images (the model's `![image](image_N.png)`
placeholders) are dropped; LaTeX math stays as written.
"""

from __future__ import annotations

import re
from functools import lru_cache
from html.parser import HTMLParser

from markdown_it import MarkdownIt

_BLOCK_END = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "blockquote", "hr"}
_LINE_END = {"li", "tr", "div", "caption"}
_CELL = {"td", "th"}


class _Text(HTMLParser):
    """Collects an HTML fragment's text, with the layout described in the module docstring."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._pre = 0
        self._after_br = False
        self._lists: list[int | None] = []  # per open list: the next number (ol), or None (ul)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "hr"):
            self.parts.append("\n")
            self._after_br = True  # markdown-it writes `<br />\n`: that newline is the same break
            return
        if tag == "pre":
            self._pre += 1
        elif tag == "ul":
            self._newline()
            self._lists.append(None)
        elif tag == "ol":
            self._newline()
            start = dict(attrs).get("start") or "1"
            self._lists.append(int(start) if start.isdigit() else 1)
        elif tag == "li":
            self._newline()
            number = self._lists[-1] if self._lists else None
            marker = "- " if number is None else f"{number}. "
            if self._lists and number is not None:
                self._lists[-1] = number + 1
            self.parts.append("  " * max(len(self._lists) - 1, 0) + marker)

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in ("ul", "ol"):
            if self._lists:
                self._lists.pop()
            if not self._lists:
                self.parts.append("\n\n")
        elif tag == "li":
            self._newline()
        elif tag in _CELL:
            self.parts.append("\t")
        elif tag in _BLOCK_END:
            self.parts.append("\n" if tag == "p" and self._lists else "\n\n")
        elif tag in _LINE_END:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._after_br and data.startswith("\n"):
            data = data[1:]
        self._after_br = False
        if self._pre or data.strip() or "\n" not in data:  # newlines between tags are layout, not text
            self.parts.append(data)

    def _newline(self) -> None:
        """End the current line, unless it just ended."""
        if self.parts and not self.parts[-1].endswith("\n"):
            self.parts.append("\n")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # Raw HTML kept, so the model's HTML tables become text like pipe tables do.
    return MarkdownIt("commonmark", {"html": True}).enable("table")


def markdown_to_text(markdown: str) -> str:
    """Plain text of `markdown` (see the module docstring); empty for empty input, else ends with one newline."""
    parser = _Text()
    parser.feed(_markdown().render(markdown))
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text.strip() else ""
