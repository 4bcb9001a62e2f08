"""The one repair the model's authors apply to its output: escaped math delimiters.

The model sometimes writes inline math as `\\$x\\$` (markdown-escaped dollars),
which renders as literal dollars. We turn such a pair back into `$x$` only when
the text between looks like math, so prices (`\\$5 and \\$10`) stay as written.

Rule: in text outside code, links and `$$` display math, two single-dollar
delimiters on one line, at least one escaped, are rewritten when the body
between them is non-empty, has no space at either end, has balanced braces,
has no prose (a run of 3+ letters that is not a TeX command, outside
`\\text{...}`), and is not a bare number.
"""

from __future__ import annotations

import re

_PROTECTED = re.compile(
    r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)"  # fenced code
    r"|(`+)[^`\n]*\2"  # inline code
    r"|\$\$.*?\$\$"  # display math
    r"|\\\[.*?\\\]|\\\(.*?\\\)"  # TeX delimiters
    r"|\]\([^)\s]*\)"  # link targets
    r"|(?:https?://|www\.)\S+",
    re.MULTILINE | re.DOTALL,
)
_DELIMITER = re.compile(r"(?<![\\$])\\?\$(?!\$)")
_TEXT_ARG = re.compile(r"\\(?:text|mathrm|mathbf|operatorname|textbf|textit)\{[^{}]*\}")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_NUMBER = re.compile(r"[-+−]?\d[\d,.\s]*")


def looks_like_math(body: str) -> bool:
    if not body or body != body.strip() or "\n" in body:
        return False
    depth = 0
    for char in re.sub(r"\\[{}]", "", body):
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    if depth:
        return False
    if _PROSE.search(_TEXT_ARG.sub("", body)):
        return False
    return not _NUMBER.fullmatch(body)


def _repair_segment(segment: str) -> str:
    tokens = list(_DELIMITER.finditer(segment))
    edits: list[tuple[int, int, str]] = []
    i = 0
    while i + 1 < len(tokens):
        left, right = tokens[i], tokens[i + 1]
        body = segment[left.end() : right.start()]
        escaped = left.group().startswith("\\") or right.group().startswith("\\")
        if "\n" in body:
            i += 1
            continue
        if not escaped:
            # Real inline math: skip both delimiters so they are not paired with others.
            i += 2 if looks_like_math(body) else 1
            continue
        if looks_like_math(body):
            edits.append((left.start(), right.end(), f"${body}$"))
            i += 2
        else:
            i += 1
    for start, end, replacement in reversed(edits):
        segment = segment[:start] + replacement + segment[end:]
    return segment


def repair_escaped_dollars(text: str) -> str:
    if "\\$" not in text:
        return text
    parts: list[str] = []
    position = 0
    for match in _PROTECTED.finditer(text):
        parts.append(_repair_segment(text[position : match.start()]))
        parts.append(match.group())
        position = match.end()
    parts.append(_repair_segment(text[position:]))
    return "".join(parts)
