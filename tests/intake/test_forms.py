"""Filled PDF forms: a field's value is drawn as every viewer shows it; other pages are unchanged."""

from __future__ import annotations

import pypdfium2 as pdfium
from PIL import Image, ImageChops

from app.intake import IntakeLimits, open_document
from app.intake.document import pdf_scale
from app.main import create_app
from tests.conftest import make_settings, wait_ready
from tests.support.documents import make_pdf
from tests.support.http import ok, post
from tests.support.openai_stub import Reply, StubRequest, StubVLLM
from tests.support.server import ServedApp

LIMITS = IntakeLimits(max_image_pixels=100_000_000)
PAGE = (612, 792)
FIELD = (100, 600, 400, 640)  # x1, y1, x2, y2 in PDF points (origin bottom left)


def filled_form_pdf(value: str) -> bytes:
    """One page with a text field whose value has no appearance stream (NeedAppearances), as software fills it."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [4 0 R] /NeedAppearances true "
        b"/DA (/Helv 0 Tf 0 g) /DR << /Font << /Helv 5 0 R >> >> >> >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Annots [4 0 R] /Contents 6 0 R /Resources << >> >>"
        % PAGE,
        b"<< /Type /Annot /Subtype /Widget /FT /Tx /T (name) /V (" + value.encode("latin-1") + b") "
        b"/Rect [%d %d %d %d] /F 4 /P 3 0 R /DA (/Helv 18 Tf 0 g) >>" % FIELD,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length 0 >>\nstream\n\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def render(data: bytes) -> Image.Image:
    document = open_document(data, limits=LIMITS)
    try:
        return document.render(0)
    finally:
        document.close()


def reference_render(data: bytes) -> Image.Image:
    """REFERENCE.md's pipeline as LightOn's renderer runs it: no form environment."""
    pdf = pdfium.PdfDocument(data)
    try:
        page = pdf[0]
        image: Image.Image = page.render(scale=pdf_scale(*page.get_size())).to_pil().convert("RGB")
        return image
    finally:
        pdf.close()


def field_box(image: Image.Image) -> Image.Image:
    return image.crop(_field_rect(image))


def dark_pixels(image: Image.Image) -> int:
    return sum(image.convert("L").point(lambda v: 255 if v < 128 else 0).histogram()[255:])


def test_a_filled_field_without_appearance_is_drawn() -> None:
    data = filled_form_pdf("Jane Q. Public 1984")
    ours, reference = render(data), reference_render(data)
    assert ours.size == reference.size
    # Without the form environment the field is blank (what the model saw before); with it, the value is there.
    assert dark_pixels(field_box(reference)) == 0
    assert dark_pixels(field_box(ours)) > 200
    # Nothing outside the field changes.
    outside = ImageChops.difference(ours, reference)
    outside.paste((0, 0, 0), _field_rect(ours))
    assert outside.getbbox() is None


def _field_rect(image: Image.Image) -> tuple[int, int, int, int]:
    scale = image.width / PAGE[0]
    x1, y1, x2, y2 = FIELD
    return (round(x1 * scale), round((PAGE[1] - y2) * scale), round(x2 * scale), round((PAGE[1] - y1) * scale))


def test_different_values_draw_differently() -> None:
    first, second = render(filled_form_pdf("AAAA")), render(filled_form_pdf("WWWWWWWWWW"))
    assert ImageChops.difference(field_box(first), field_box(second)).getbbox() is not None


def test_pages_without_form_fields_are_pixel_identical_to_the_reference() -> None:
    data = make_pdf(2, (595.28, 841.89))
    document = open_document(data, limits=LIMITS)
    try:
        ours = [document.render(index) for index in range(2)]
    finally:
        document.close()
    pdf = pdfium.PdfDocument(data)
    try:
        for index, image in enumerate(ours):
            page = pdf[index]
            reference = page.render(scale=pdf_scale(*page.get_size())).to_pil().convert("RGB")
            assert image.tobytes() == reference.tobytes()
    finally:
        pdf.close()


def test_the_model_gets_the_field_value_through_the_service() -> None:
    """End to end (intake workers -> vLLM engine -> stand-in): the page the model receives shows the value."""
    seen: list[Image.Image] = []

    def responder(request: StubRequest) -> Reply:
        seen.append(request.image)
        return Reply(text="form")

    with StubVLLM(responder) as stub:
        settings = make_settings(model_source="vllm", vllm_base_url=stub.base_url, retry_temperatures="")
        served = ServedApp(create_app(settings)).start()
        try:
            wait_ready(served.url, timeout=60)
            ok(post(served.url, filled_form_pdf("Jane Q. Public 1984")))
        finally:
            served.stop()
    [image] = seen
    assert image.size == reference_render(filled_form_pdf("x")).size
    assert dark_pixels(field_box(image)) > 200
