"""Grounding output and `-bbox` picture boxes into blocks with pixel boxes; what cannot be trusted is warned about."""

from __future__ import annotations

import random

from PIL import Image

from app.grounding import crop_box, crop_picture, inline_pictures, picture_name, read_grounding, read_plain

# A two-column paper page as LightOnOCR-3 writes it in grounding mode: a running header, a title, a paragraph
# that flows from the left column into the right one (`text+`), a chart with its data, a table, a formula,
# a footnote and the page number.
TWO_COLUMNS = """![header](88,30,912,44) LightOnOCR-3: Grounded Document Understanding
![title](88,60,500,80) ## 2.2 LightOnOCR-1
![text](88,90,490,610) The first version of LightOnOCR [13] was trained on 17.6 million pages and
![text+](510,90,912,180) reached state-of-the-art results for its size.
![chart](510,190,912,420) <table><tr><th>Model</th><th>Score</th></tr><tr><td>1B</td><td>76.1</td></tr></table>
![caption](510,425,912,440) Figure 2: Scores on OlmOCR-Bench.
![table](88,620,490,800)
<table>
<tr><th>Pages</th><th>Tokens</th></tr>
<tr><td>17.6M</td><td>40B</td></tr>
</table>
![formula](510,460,912,500) $$
L = -\\sum_t \\log p(y_t)
$$
![footnote](88,930,490,950) ¹ Measured on one H100.
![page_number](480,965,520,980) 3
"""


def test_two_columns_blocks_labels_and_pixel_boxes() -> None:
    parsed = read_grounding(TWO_COLUMNS, page=3, width=1190, height=1540)
    assert parsed.warnings == []
    labels = [block.label for block in parsed.blocks]
    assert labels == ["header", "title", "text", "chart", "caption", "table", "formula", "footnote", "page_number"]
    types = [block.type for block in parsed.blocks]
    assert types == [
        "paragraph",
        "heading",
        "paragraph",
        "table",
        "paragraph",
        "table",
        "math",
        "paragraph",
        "paragraph",
    ]
    title = parsed.blocks[1]
    assert (title.text, title.level, title.page) == ("## 2.2 LightOnOCR-1", 2, 3)
    assert title.bbox_norm == [88, 60, 500, 80]
    assert title.bbox == [round(88 * 1.19), round(60 * 1.54), round(500 * 1.19), round(80 * 1.54)]
    # The continuation is merged into the paragraph it continues; its box is kept beside the first one.
    text = parsed.blocks[2]
    assert text.text == (
        "The first version of LightOnOCR [13] was trained on 17.6 million pages and "
        "reached state-of-the-art results for its size."
    )
    assert text.bbox_norm == [88, 90, 490, 610]
    assert [part.bbox_norm for part in text.continuations] == [[510, 90, 912, 180]]
    assert text.continuations[0].bbox == [round(510 * 1.19), round(90 * 1.54), round(912 * 1.19), round(180 * 1.54)]
    # A block's text may start on the line after its marker and span lines.
    assert parsed.blocks[5].text.startswith("<table>\n<tr><th>Pages")
    assert parsed.blocks[5].text.endswith("</table>")
    assert parsed.blocks[6].text == "$$\nL = -\\sum_t \\log p(y_t)\n$$"


def test_page_text_has_no_markers() -> None:
    parsed = read_grounding(TWO_COLUMNS, page=1, width=1000, height=1000)
    assert "![" not in parsed.text
    assert parsed.text.startswith("LightOnOCR-3: Grounded Document Understanding\n\n## 2.2 LightOnOCR-1\n\n")
    assert parsed.text.endswith("¹ Measured on one H100.\n\n3")
    assert parsed.text == "\n\n".join(block.text for block in parsed.blocks)


def test_drop_headers_footers_leaves_them_in_blocks_only() -> None:
    parsed = read_grounding(TWO_COLUMNS, page=1, width=1000, height=1000, drop_headers_footers=True)
    assert parsed.text.startswith("## 2.2 LightOnOCR-1\n\n")
    assert "Grounded Document Understanding" not in parsed.text
    assert "Measured on one H100" not in parsed.text
    assert not parsed.text.endswith("3")
    assert parsed.text.endswith("$$\nL = -\\sum_t \\log p(y_t)\n$$")
    assert [block.label for block in parsed.blocks] == [
        block.label for block in read_grounding(TWO_COLUMNS, page=1, width=1000, height=1000).blocks
    ]


def test_image_block_refers_to_its_crop_instead_of_coordinates() -> None:
    raw = "![image](309,90,691,516) Model architecture diagram showing the encoder.\n![text](1,600,999,700) After."
    parsed = read_grounding(raw, page=2, width=1000, height=1000)
    image = parsed.blocks[0]
    assert image.type == "image"
    assert image.picture == 1
    assert image.text == f"![image]({picture_name(2, 1)})\n\nModel architecture diagram showing the encoder."
    assert "309,90" not in parsed.text


def test_truncated_last_marker_is_dropped_with_a_warning() -> None:
    raw = "![text](10,10,990,100) Complete paragraph.\n![text](10,120,9"
    parsed = read_grounding(raw, page=1, width=1000, height=1000)
    assert [block.text for block in parsed.blocks] == ["Complete paragraph."]
    assert parsed.text == "Complete paragraph."
    assert [warning.code for warning in parsed.warnings] == ["cut_marker"]
    for cut in ("![", "![tab", "![table+", "![table]", "![table](", "![table](10, 20,"):
        parsed = read_grounding(f"![text](10,10,990,100) Kept.\n{cut}", page=1, width=100, height=100)
        assert parsed.text == "Kept.", cut
        assert [w.code for w in parsed.warnings] == ["cut_marker"], cut


def test_last_block_cut_mid_text_is_kept() -> None:
    parsed = read_grounding("![text](10,10,990,100) The sentence stops in the mid", page=1, width=100, height=100)
    assert parsed.text == "The sentence stops in the mid"
    assert parsed.warnings == []


def test_bad_boxes_keep_the_block_without_a_box() -> None:
    raw = (
        "![text](10,10,1200,100) Out of range.\n"
        "![text](500,10,100,100) Inverted.\n"
        "![text](10,10,10,100) Empty.\n"
        "![text](10,10,100) Three numbers.\n"
        "![text](-5,10,100,100) Negative.\n"
        "![text](10,200,990,300) Fine."
    )
    parsed = read_grounding(raw, page=1, width=1000, height=1000)
    assert [block.text for block in parsed.blocks] == [
        "Out of range.", "Inverted.", "Empty.", "Three numbers.", "Negative.", "Fine.",
    ]  # fmt: skip
    assert [block.bbox for block in parsed.blocks[:5]] == [None] * 5
    assert [block.bbox_norm for block in parsed.blocks[:5]] == [None] * 5
    assert parsed.blocks[5].bbox == [10, 200, 990, 300]
    assert [warning.code for warning in parsed.warnings] == ["bad_box"] * 5
    assert "block 1 (`text`)" in parsed.warnings[0].message
    assert "1200" in parsed.warnings[0].message
    assert "![" not in parsed.text


def test_an_image_with_a_bad_box_is_a_picture_without_box() -> None:
    parsed = read_grounding("![image](600,10,500,100) A photo.", page=1, width=100, height=100)
    assert parsed.blocks[0].picture == 1
    assert parsed.blocks[0].bbox is None
    assert parsed.blocks[0].text == "![image](page_1_image_1.png)\n\nA photo."


def test_unknown_label_is_kept_as_written() -> None:
    parsed = read_grounding("![sidebar](10,10,300,900) Aside.\n![text](400,10,990,900) Main.", 1, 1000, 1000)
    assert [(block.label, block.type) for block in parsed.blocks] == [("sidebar", "paragraph"), ("text", "paragraph")]
    assert parsed.blocks[0].bbox == [10, 10, 300, 900]
    assert [warning.code for warning in parsed.warnings] == ["unknown_label"]
    assert parsed.text == "Aside.\n\nMain."


def test_continuation_without_a_block_before_stands_alone() -> None:
    parsed = read_grounding("![text+](10,10,990,100) ...the end of last page's paragraph.", 4, 100, 100)
    assert [(block.label, block.text) for block in parsed.blocks] == [("text", "...the end of last page's paragraph.")]


def test_continuations_chain_across_three_columns() -> None:
    raw = "![list](10,10,300,900) - one\n![list+](350,10,650,900) two\n![list+](700,10,990,900) three"
    parsed = read_grounding(raw, page=1, width=1000, height=1000)
    assert len(parsed.blocks) == 1
    assert parsed.blocks[0].text == "- one two three"
    assert [box.bbox for box in parsed.blocks[0].continuations] == [[350, 10, 650, 900], [700, 10, 990, 900]]


def test_text_before_the_first_marker_is_kept_and_warned() -> None:
    parsed = read_grounding("Stray words.\n![text](10,10,990,100) Body.", page=1, width=100, height=100)
    assert [block.text for block in parsed.blocks] == ["Stray words.", "Body."]
    assert parsed.blocks[0].label is None
    assert parsed.blocks[0].bbox is None
    assert [warning.code for warning in parsed.warnings] == ["unmarked_text"]


def test_output_without_markers() -> None:
    assert read_grounding("", page=1, width=10, height=10).blocks == []
    parsed = read_grounding("Just text.", page=1, width=10, height=10)
    assert parsed.text == "Just text."
    assert parsed.blocks[0].label is None


def test_plain_json_has_no_grounding_fields() -> None:
    block = read_plain("Hello.", page=1, width=10, height=10).blocks[0]
    assert block.model_dump(mode="json") == {"type": "paragraph", "page": 1, "text": "Hello.", "level": None}


# -- the -bbox checkpoints -------------------------------------------------------------------


BBOX_PAGE = """# Results

![image](image_1.png)120,40,880,410

Figure 1 shows the pipeline.

![image](image_2.png) 100,500,480,700
![image](image_3.png)100,720,480,1040

| a | ![image](image_4.png)600,500,900,700 |
|---|---|
"""


def test_bbox_pictures_become_image_blocks_with_boxes() -> None:
    parsed = read_plain(BBOX_PAGE, page=2, width=1000, height=2000)
    pictures = [block for block in parsed.blocks if block.type == "image"]
    assert [block.picture for block in pictures] == [1, 2, 3, 4]
    assert pictures[0].text == "![image](page_2_image_1.png)"
    assert pictures[0].bbox_norm == [120, 40, 880, 410]
    assert pictures[0].bbox == [120, 80, 880, 820]
    # Two pictures on consecutive lines are one paragraph for markdown: each still gets a block of its own.
    assert pictures[1].bbox == [100, 1000, 480, 1400]
    # The third box is out of range: the picture is kept without a box.
    assert pictures[2].bbox is None
    assert pictures[2].text == "![image](page_2_image_3.png)"
    # A picture inside a table cell gets its own block after the table.
    assert pictures[3].bbox_norm == [600, 500, 900, 700]
    assert parsed.blocks[parsed.blocks.index(pictures[3]) - 1].type == "table"
    assert [warning.code for warning in parsed.warnings] == ["bad_box"]
    for coordinates in ("120,40,880,410", "100,500,480,700", "600,500,900,700", "1040"):
        assert coordinates not in parsed.text
    assert "![image](page_2_image_1.png)\n\nFigure 1" in parsed.text


def test_markdown_without_pictures_is_unchanged() -> None:
    page = "# T\n\n![image](image_1.png)\n\nText, 1,2,3."
    assert read_plain(page, page=1, width=10, height=10).text == page


# -- crops ---------------------------------------------------------------------------------------


def _noise(width: int, height: int) -> Image.Image:
    rng = random.Random(7)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


def test_crop_is_the_page_pixels_with_a_5px_margin() -> None:
    page = _noise(120, 90)
    crop = crop_picture(page, [30, 20, 70, 60])
    assert crop.size == (50, 50)
    for x in range(crop.width):
        for y in range(crop.height):
            assert crop.getpixel((x, y)) == page.getpixel((25 + x, 15 + y))


def test_crop_margin_stops_at_the_page_edge() -> None:
    assert crop_box([2, 0, 118, 88], 120, 90) == (0, 0, 120, 90)
    assert crop_picture(_noise(120, 90), [0, 0, 120, 90]).size == (120, 90)


def test_inline_pictures_carry_the_crop_as_png() -> None:
    import base64
    import io

    page = _noise(200, 100)
    parsed = read_plain("![image](image_1.png)100,100,500,600\n\nText.", page=1, width=200, height=100)
    blocks = inline_pictures(parsed.blocks, page)
    image = blocks[0].image
    assert image is not None
    assert image.startswith("data:image/png;base64,")
    crop = Image.open(io.BytesIO(base64.b64decode(image.removeprefix("data:image/png;base64,"))))
    assert crop.tobytes() == page.crop((15, 5, 105, 65)).tobytes()
    assert blocks[1].image is None
