"""The escaped-dollar repair: math restored, prices and code untouched."""

from __future__ import annotations

import pytest

from app.postprocess import repair_escaped_dollars


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        (r"Let \$x\$ be real.", r"Let $x$ be real."),
        (r"\$\alpha^2 + \beta_{i}\$", r"$\alpha^2 + \beta_{i}$"),
        (r"\$a_{i}\$, \$b\$", r"$a_{i}$, $b$"),
        (r"\$E=mc^2\$ costs \$10", r"$E=mc^2$ costs \$10"),
        (r"\$\text{total cost} = n\$", r"$\text{total cost} = n$"),
        (r"mixed $x\$ delimiters", r"mixed $x$ delimiters"),
    ],
)
def test_math_is_repaired(raw: str, fixed: str) -> None:
    assert repair_escaped_dollars(raw) == fixed


@pytest.mark.parametrize(
    "text",
    [
        r"costs \$5 and \$10 each",
        r"price \$5\$",
        r"\$the end\$",
        r"`\$x\$` in code",
        "```\n\\$x\\$\n```",
        r"$x$ already fine",
        r"$$\$x\$$$",
        r"\$x" + "\n" + r"y\$",
    ],
)
def test_left_alone(text: str) -> None:
    assert repair_escaped_dollars(text) == text
