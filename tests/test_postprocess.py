"""The escaped-dollar repair: math restored, prices and code untouched."""

from __future__ import annotations

import pytest

from app.postprocess import looks_like_math, repair_escaped_dollars


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


@pytest.mark.parametrize(
    "text",
    [
        # Unbalanced braces: a closing brace before its opening one, or one left open.
        r"\$a}{b\$",
        r"\$x}\$",
        r"\$\frac{a\$",
        r"\$a{{b}\$",
        # Escaped braces do not count towards the balance, so these stay unbalanced.
        r"\$\{a}\$",
        r"\$a\}{\$",
        # Body with a space at either end, or empty.
        r"\$ x\$",
        r"\$x \$",
        r"\$\$",
        # Prose and bare numbers.
        r"\$two words\$",
        r"\$-1,000.50\$",
    ],
)
def test_bodies_that_do_not_look_like_math_are_left_alone(text: str) -> None:
    assert repair_escaped_dollars(text) == text


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        # Escaped braces are not braces: `\{a\}` is balanced text.
        (r"\$\{a\}\$", r"$\{a\}$"),
        (r"\$a\}\$", r"$a\}$"),
        (r"\$\sqrt{x}\$", r"$\sqrt{x}$"),
        (r"\$\mathrm{kg}\cdot{m}\$", r"$\mathrm{kg}\cdot{m}$"),
        (r"\$x_{\text{max}}\$", r"$x_{\text{max}}$"),
        (r"\$n\$-th \$k\$", r"$n$-th $k$"),
    ],
)
def test_balanced_math_is_repaired(raw: str, fixed: str) -> None:
    assert repair_escaped_dollars(raw) == fixed


@pytest.mark.parametrize(
    "text",
    [
        # Link targets and URLs may hold escaped dollars that are not math.
        r"[price](https://example.com/a\$b\$c)",
        r"[x](p\$q\$)",
        r"see https://example.com/\$x\$ for details",
        r"see www.example.com/\$x\$ today",
        # Math already inside TeX delimiters is the author's, not ours to touch.
        r"\(a \$x\$ b\)",
        r"\[\$y\$\]",
        "\\[\n\\$y\\$\n\\]",
    ],
)
def test_links_urls_and_tex_delimiters_are_left_alone(text: str) -> None:
    assert repair_escaped_dollars(text) == text


def test_protected_spans_do_not_stop_repairs_around_them() -> None:
    raw = r"\$a\$ [link](https://x.org/\$b\$) \(\$c\$\) \$d\$ `\$e\$` \$f\$"
    assert repair_escaped_dollars(raw) == r"$a$ [link](https://x.org/\$b\$) \(\$c\$\) $d$ `\$e\$` $f$"


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        # Either delimiter may be the escaped one.
        (r"\$x$ here", r"$x$ here"),
        # Real inline math is skipped whole, so its closing dollar is not paired with a later escaped one...
        (r"$x$y\$", r"$x$y\$"),
        (r"$x$ \$y\$", r"$x$ $y$"),
        (r"\$5 $x$y\$", r"\$5 $x$y\$"),
        # ...but a pair of plain dollars around prose is not math: its second dollar may open an escaped pair.
        (r"$5 and $x\$", r"$5 and $x$"),
        # A pair that is not math moves on by one delimiter, whatever came before it.
        (r"\$5 \$x\$", r"\$5 $x$"),
        (r"\$x\$ \$5 \$y\$", r"$x$ \$5 $y$"),
        # A pair split across lines is skipped by one delimiter; later pairs on one line are still repaired.
        ("\\$a\nb\\$c\\$", "\\$a\nb$c$"),
        ("\\$a\\$ \\$b\nc\\$ \\$d\\$", "$a$ \\$b\nc\\$ $d$"),
    ],
)
def test_delimiters_are_paired_left_to_right(raw: str, fixed: str) -> None:
    assert repair_escaped_dollars(raw) == fixed


@pytest.mark.parametrize(
    ("body", "math"),
    [
        ("x", True),
        (r"\frac{a}{b}", True),
        ("a\nb", False),
        ("", False),
        (" x", False),
        ("x ", False),
        ("}x{", False),
        ("{x", False),
        ("x}", False),
        (r"\{x", True),
        ("total", False),
        (r"\text{total}", True),
        ("12", False),
        ("-1,000.5", False),
        ("2x", True),
    ],
)
def test_looks_like_math(body: str, math: bool) -> None:
    assert looks_like_math(body) is math
