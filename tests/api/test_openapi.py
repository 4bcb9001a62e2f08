"""One source for what each error code means: the error classes' docstrings (app/errors.py)."""

from __future__ import annotations

import re
from pathlib import Path

from app.api.openapi import describe_code, error_codes
from app.errors import OCRError, error_classes

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_error_class_says_when_it_is_raised() -> None:
    missing = [cls.__name__ for cls in error_classes().values() if not (cls.__doc__ or "").strip()]
    assert missing == []
    assert all(cls.__doc__ != OCRError.__doc__ for cls in error_classes().values() if cls is not OCRError)


def test_descriptions_come_from_the_docstrings() -> None:
    assert describe_code("too_many_pages") == "more pages selected than `MAX_PAGES`"
    assert describe_code("unauthorized").startswith("API keys are on")  # an acronym keeps its case
    assert describe_code("not_found") == "unknown route"  # the framework's own


def test_readme_error_table_lists_every_code() -> None:
    text = README.read_text()
    section = text[text.index("### Errors") :]
    section = section[: section.index("\n## ")]
    listed = set(re.findall(r"`([a-z_]+)`", "\n".join(line for line in section.splitlines() if line.startswith("|"))))
    missing = [f"{status} {code}" for status, code in error_codes() if code not in listed]
    assert missing == [], f"README's error table lacks: {missing}"
