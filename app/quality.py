"""Detecting runaway generations: pages that loop instead of ending.

LightOnOCR fights repetition loops in training but nothing stops them at
inference; a looping page runs to MAX_NEW_TOKENS and its tail is garbage.

Rule (checked on the end of the text, where a loop that ran to the token limit sits):
- line cycle: the last lines are a block of 1-5 non-blank lines repeated
  identically at least 6 times in a row;
- word cycle: among the last 400 words, a block of 1-30 words repeats at least
  8 times in a row at the very end and the repeated run spans at least 40 words.
Both need an exact repeat at the end of the text, so ordinary repeated
structure (table rows with different values, list bullets) does not trigger it.
"""

from __future__ import annotations

LINE_PERIOD_MAX = 5
LINE_REPEATS_MIN = 6
WORD_WINDOW = 400
WORD_PERIOD_MAX = 30
WORD_REPEATS_MIN = 8
WORD_SPAN_MIN = 40


def _trailing_repeats(items: list[str], period: int) -> int:
    """How many times the last `period` items repeat back-to-back at the end."""
    if period > len(items):
        return 0
    run = period
    while run < len(items) and items[-run - 1] == items[-run - 1 + period]:
        run += 1
    return run // period


def has_line_cycle(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return any(_trailing_repeats(lines, period) >= LINE_REPEATS_MIN for period in range(1, LINE_PERIOD_MAX + 1))


def has_word_cycle(text: str) -> bool:
    words = text.split()[-WORD_WINDOW:]
    for period in range(1, WORD_PERIOD_MAX + 1):
        repeats = _trailing_repeats(words, period)
        if repeats >= WORD_REPEATS_MIN and repeats * period >= WORD_SPAN_MIN:
            return True
    return False


def is_repetitive(text: str) -> bool:
    return has_line_cycle(text) or has_word_cycle(text)
