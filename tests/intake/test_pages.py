"""The `pages` selection: what is selected, and every way a selection is refused."""

from __future__ import annotations

import pytest

from app.errors import InvalidPages
from app.intake import parse_page_selection


@pytest.mark.parametrize(
    ("spec", "count", "indices"),
    [
        (None, 3, [0, 1, 2]),
        ("", 3, [0, 1, 2]),
        ("  ", 3, [0, 1, 2]),
        ("1", 1, [0]),
        ("2", 3, [1]),
        (" 2 ", 3, [1]),
        ("1-3", 5, [0, 1, 2]),
        ("1 - 3", 5, [0, 1, 2]),
        ("2-2", 3, [1]),
        ("4-", 4, [3]),
        ("2-", 5, [1, 2, 3, 4]),
        ("5,1-2", 5, [0, 1, 4]),
        ("1-3,2-4", 5, [0, 1, 2, 3]),
        ("3,3", 3, [2]),
    ],
)
def test_selected_pages(spec: str | None, count: int, indices: list[int]) -> None:
    assert parse_page_selection(spec, count) == indices


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("0", 3, "invalid page range '0'"),
        ("0-2", 3, "invalid page range '0-2'"),
        ("3-1", 3, "invalid page range '3-1'"),
        ("4", 3, "page 4 requested but the document has 3 page(s)"),
        ("2-4", 3, "page 4 requested but the document has 3 page(s)"),
        ("5-", 4, "page 5 requested but the document has 4 page(s)"),
        ("a", 3, "invalid page selection 'a'"),
        ("1,,2", 3, "invalid page selection ''"),
        ("1-2-3", 3, "invalid page selection '1-2-3'"),
        ("-2", 3, "invalid page selection '-2'"),
        ("1.5", 3, "invalid page selection '1.5'"),
    ],
)
def test_refused_selections(spec: str, count: int, message: str) -> None:
    with pytest.raises(InvalidPages) as caught:
        parse_page_selection(spec, count)
    assert message in caught.value.message
    assert caught.value.details["pages"] == spec


def test_a_page_past_the_end_says_how_many_pages_there_are() -> None:
    with pytest.raises(InvalidPages) as caught:
        parse_page_selection("1,9", 4)
    assert caught.value.details == {"pages": "1,9", "page_count": 4}
