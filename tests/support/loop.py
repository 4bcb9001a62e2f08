"""Whether work ran on the event loop: for checks that blocking work is sent to a thread."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest


def calls_on_the_loop(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[bool]:
    """Wrap `owner.name`: each call appends whether it ran in an event loop's thread (True) or off it."""
    original = getattr(owner, name)
    on_loop: list[bool] = []

    @functools.wraps(original)
    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return on_loop
