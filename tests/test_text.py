"""The one markdown-to-plain-text converter, and that every face uses it (one table of inputs -> outputs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.cli import OutputFormat, render
from app.results import DocumentResult
from app.text import markdown_to_text

CASES: list[tuple[str, str]] = [
    ("", ""),
    ("- one\n- two", "- one\n- two\n"),
    ("1. a\n2. b\n   - c\n   - d\n3. e", "1. a\n2. b\n  - c\n  - d\n3. e\n"),
    ("3. three\n4. four", "3. three\n4. four\n"),
    ("x\n\n- one\n- two\n\ny", "x\n\n- one\n- two\n\ny\n"),
    ("# Annual *report*\n\nRevenue grew **12%**.", "Annual report\n\nRevenue grew 12%.\n"),
    ("see [the table](http://x/t) and `code`", "see the table and code\n"),
    ("| Year | Total |\n|---|---:|\n| 2024 | 5 |", "Year\tTotal\n2024\t5\n"),
    ("<table><tr><th>A</th><th>B</th></tr><tr><td>1 &amp; 2</td><td>3</td></tr></table>", "A\tB\n1 & 2\t3\n"),
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("- item with $x_1 + y_2$", "- item with $x_1 + y_2$\n"),
    ("$$\nE = mc^2\n$$", "$$\nE = mc^2\n$$\n"),
    ("![image](image_1.png)\n\nCaption", "Caption\n"),
    ("> quoted", "quoted\n"),
    ("line one  \nline two", "line one\nline two\n"),
]


def _cli_txt(markdown: str) -> str:
    result = DocumentResult(status="ok", text=markdown, blocks=[], model_version="m", pages=[])
    return render(result, OutputFormat.TXT)


FACES: dict[str, Callable[[str], str]] = {"core": markdown_to_text, "cli": _cli_txt}


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(("markdown", "text"), CASES)
def test_markdown_to_text(face: str, markdown: str, text: str) -> None:
    if face == "cli" and not markdown:
        text = "\n"  # the CLI writes a file, which always ends with a newline
    assert FACES[face](markdown) == text
