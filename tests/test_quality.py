"""The repetition rule: loops at the end of a page are caught, ordinary repeated structure is not."""

from __future__ import annotations

import pytest

from app.quality import (
    LINE_PERIOD_MAX,
    LINE_REPEATS_MIN,
    WORD_PERIOD_MAX,
    WORD_REPEATS_MIN,
    WORD_SPAN_MIN,
    _trailing_repeats,
    has_line_cycle,
    has_word_cycle,
    is_repetitive,
)

INTRO = "# Quarterly report\n\nRevenue grew in every region, led by exports.\n\n"


def words(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# --------------------------------------------------------------------------- line cycles


@pytest.mark.parametrize("period", range(1, LINE_PERIOD_MAX + 1))
def test_line_cycle_of_each_period_at_the_threshold(period: int) -> None:
    block = [f"| total | {i} |" for i in range(period)]
    at = INTRO + "\n".join(block * LINE_REPEATS_MIN)
    below = INTRO + "\n".join(block * (LINE_REPEATS_MIN - 1))
    assert has_line_cycle(at)
    assert is_repetitive(at)
    assert not has_line_cycle(below)


def test_line_cycle_ignores_blank_lines_and_indentation() -> None:
    text = INTRO + "\n\n".join(["  - the same bullet  "] * LINE_REPEATS_MIN)
    assert has_line_cycle(text)


def test_line_cycle_must_be_at_the_end() -> None:
    looped = "\n".join(["same line"] * 20)
    assert has_line_cycle(looped)
    assert not has_line_cycle(looped + "\nThe page ends normally here.")


def test_line_period_beyond_the_maximum_is_not_a_line_cycle() -> None:
    block = [f"line {i} of a long block" for i in range(LINE_PERIOD_MAX + 1)]
    assert not has_line_cycle("\n".join(block * LINE_REPEATS_MIN * 2))


# --------------------------------------------------------------------------- word cycles


def test_word_cycle_in_one_line() -> None:
    text = INTRO + " ".join(["the", "cat", "sat"] * 20)
    assert not has_line_cycle(text)
    assert has_word_cycle(text)
    assert is_repetitive(text)


def test_word_cycle_needs_enough_repeats() -> None:
    # Period 5: the span is reached (8 x 5 = 40) exactly at WORD_REPEATS_MIN.
    block = words(5)
    assert WORD_REPEATS_MIN * 5 == WORD_SPAN_MIN
    assert has_word_cycle(" ".join(words(30, "x") + block * WORD_REPEATS_MIN))
    assert not has_word_cycle(" ".join(words(30, "x") + block * (WORD_REPEATS_MIN - 1)))


def test_word_cycle_needs_the_minimum_span() -> None:
    # Period 2 repeated 19 times spans 38 words (< 40): a short stutter, not a loop; 20 times spans 40.
    block = ["ha", "ho"]
    assert not has_word_cycle(" ".join(words(30, "x") + block * 19))
    assert has_word_cycle(" ".join(words(30, "x") + block * 20))


def test_word_period_at_the_maximum_and_beyond() -> None:
    block = words(WORD_PERIOD_MAX)
    assert has_word_cycle(" ".join(block * WORD_REPEATS_MIN))
    longer = words(WORD_PERIOD_MAX + 1)
    assert not has_word_cycle(" ".join(longer * WORD_REPEATS_MIN))


def test_word_cycle_only_looks_at_the_end() -> None:
    looped = " ".join(["again"] * 100)
    assert has_word_cycle(looped)
    assert not has_word_cycle(looped + " " + " ".join(words(50)))


# --------------------------------------------------------------------------- legitimate pages


def test_table_with_different_rows_is_not_repetitive() -> None:
    rows = [f"| {2000 + i} | {i * 17 % 97} | {i * 31 % 89} |" for i in range(60)]
    html = "".join(f"<tr><td>Item {i}</td><td>{i * 3}</td></tr>" for i in range(80))
    assert not is_repetitive(INTRO + "| year | a | b |\n|---|---|---|\n" + "\n".join(rows))
    assert not is_repetitive(INTRO + f"<table>{html}</table>")


def test_structured_repetition_with_varying_values_is_not_repetitive() -> None:
    bullets = "\n".join(f"- Item {i}: see section {i + 1}" for i in range(50))
    dotted = "\n".join(f"Chapter {i} .......... {i * 10}" for i in range(1, 40))
    assert not is_repetitive(bullets)
    assert not is_repetitive(dotted)


def test_a_few_identical_lines_are_not_a_loop() -> None:
    # Empty table cells or signature lines repeat a little on real pages.
    text = INTRO + "\n".join(["| | |"] * (LINE_REPEATS_MIN - 1)) + "\n"
    assert not is_repetitive(text)


def test_long_legit_page_is_not_repetitive() -> None:
    paragraphs = [
        f"Paragraph {p}: " + " ".join(f"token{p}_{i}" for i in range(80)) + "." for p in range(40)
    ]  # ~3,200 words, every one different
    text = INTRO + "\n\n".join(paragraphs)
    assert len(text.split()) > 3000
    assert not is_repetitive(text)


def test_empty_and_tiny_texts_are_not_repetitive() -> None:
    assert not is_repetitive("")
    assert not is_repetitive("\n\n  \n")
    assert not is_repetitive("ok")


# --------------------------------------------------------------------------- runaway pages


def test_a_runaway_page_of_thousands_of_words_is_caught_at_its_end() -> None:
    # Real runaway pages: a normal start well past the 400-word window, then a loop to the token limit.
    prose = " ".join(words(600, "intro"))
    loop = " ".join(["and", "then", "the", "value", "is"] * 600)
    text = INTRO + prose + " " + loop
    assert len(text.split()) > 3000
    assert not has_line_cycle(text)
    assert has_word_cycle(text)
    assert is_repetitive(text)


def test_a_long_page_that_loops_early_and_recovers_is_not_flagged() -> None:
    looped = " ".join(["again"] * 500)
    text = looped + " " + " ".join(words(500, "after"))
    assert not has_word_cycle(text)
    assert not is_repetitive(text)


def test_a_word_loop_longer_than_the_window_is_still_caught() -> None:
    assert has_word_cycle(" ".join(words(10)) + " " + " ".join(["x", "y", "z"] * 1000))


# --------------------------------------------------------------------------- the counting helper


@pytest.mark.parametrize(
    ("items", "period", "repeats"),
    [
        (["a"], 1, 1),  # the whole list is one block
        (["a"], 2, 0),  # a period longer than the list: no block at all
        (list("xaaaa"), 1, 4),
        (list("babab"), 2, 2),  # 5 items of period 2: two whole repeats, not 2.5
        (list("xababab"), 2, 3),
        (list("abcabcab"), 3, 2),  # the run ends mid-block: whole blocks only
        ([], 1, 0),
    ],
)
def test_trailing_repeats_counts_whole_blocks_at_the_end(items: list[str], period: int, repeats: int) -> None:
    assert _trailing_repeats(items, period) == repeats
