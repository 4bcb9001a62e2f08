"""`.env.example` documents every setting, and only settings, with the defaults as values.

A variable is either set (`NAME=value`) or commented out (`# NAME=value`); prose comments
never look like an assignment. Set values must parse to the field's default, exactly as the
service would read them from a `.env` file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"

_ASSIGNMENT = re.compile(r"^(?P<commented>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
FIELDS = {name.upper(): name for name in Settings.model_fields}


def _entries() -> list[tuple[str, str, bool]]:
    """(NAME, value, commented_out) for every assignment line, in file order."""
    entries = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match:
            entries.append((match["name"], match["value"], match["commented"] is not None))
    return entries


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own environment must not leak into the comparison."""
    for name in FIELDS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_names_are_exactly_the_settings_fields() -> None:
    names = [name for name, _, _ in _entries()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"listed more than once in .env.example: {duplicates}"
    assert set(names) == set(FIELDS)


def test_values_are_plain() -> None:
    """No quotes or inline comments: what is written is what the service reads."""
    for name, value, _ in _entries():
        assert value == value.strip(), f"{name}: surrounding whitespace"
        assert not value.startswith(("'", '"')), f"{name}: quoted value"
        assert " #" not in value, f"{name}: inline comment"


@pytest.mark.usefixtures("clean_env")
def test_every_value_is_the_default() -> None:
    defaults = Settings(_env_file=None)
    for name, value, _ in _entries():
        field = FIELDS[name]
        parsed = Settings(_env_file=None, **{field: value})  # type: ignore[arg-type]
        assert getattr(parsed, field) == getattr(defaults, field), f"{name}={value} is not the default"
        assert getattr(defaults, field) == Settings.model_fields[field].default


@pytest.mark.usefixtures("clean_env")
def test_the_file_loads_as_the_defaults() -> None:
    """Read as a real `.env` (pydantic-settings' own parser), the file changes nothing."""
    assert any(not commented for _, _, commented in _entries())
    from_file = Settings(_env_file=ENV_EXAMPLE)
    assert from_file.model_dump() == Settings(_env_file=None).model_dump()
