"""Markdown to typed blocks, in reading order, each with its page and source."""

from __future__ import annotations

from app.blocks import parse_blocks

PAGE = """# Title

Some text with $x$ math.

- a
- b

| a | b |
|---|---|
| 1 | 2 |

<table><tr><td>1</td></tr></table>

$$
E = mc^2
$$

![image](image_1.png)120,40,880,410

```
code
```

---

1. one
2. two
"""


def test_block_types_in_order() -> None:
    blocks = parse_blocks(PAGE, page=3)
    assert [b.type for b in blocks] == [
        "heading", "paragraph", "list", "table", "table", "math", "image", "code", "list",
    ]  # fmt: skip
    assert {b.page for b in blocks} == {3}
    assert blocks[0].level == 1
    assert blocks[0].text == "# Title"
    assert blocks[3].text == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert blocks[5].text == "$$\nE = mc^2\n$$"


def test_empty_page_has_no_blocks() -> None:
    assert parse_blocks("", page=1) == []
    assert parse_blocks("\n\n  \n", page=1) == []
