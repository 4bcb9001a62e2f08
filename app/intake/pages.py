"""Parsing of the `pages` selection (`1-3,7`, `5-`)."""

from __future__ import annotations

import re

from app.errors import InvalidPages

_PART = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?$")


def parse_page_selection(spec: str | None, page_count: int) -> list[int]:
    """Return the selected 0-based page indices, sorted and without duplicates.

    An empty or missing selection means every page. `N-` runs to the last page.
    A page past the end is an error rather than silently dropped: the caller
    asked for something the document does not have.
    """
    if spec is None or not spec.strip():
        return list(range(page_count))
    selected: set[int] = set()
    for part in spec.split(","):
        match = _PART.match(part)
        if match is None:
            raise InvalidPages(
                f"invalid page selection {part.strip()!r}: use numbers and ranges like '1-3,7' or '5-'",
                pages=spec,
            )
        first = int(match.group(1))
        last = (int(match.group(3)) if match.group(3) else max(first, page_count)) if match.group(2) else first
        if first < 1 or last < first:
            raise InvalidPages(f"invalid page range {part.strip()!r}", pages=spec)
        if max(first, last) > page_count:
            raise InvalidPages(
                f"page {max(first, last)} requested but the document has {page_count} page(s)",
                pages=spec,
                page_count=page_count,
            )
        selected.update(range(first - 1, last))
    return sorted(selected)
