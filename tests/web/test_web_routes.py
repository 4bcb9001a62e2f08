"""The web page's routes: the page and assets load without a key, /web/render shows what the model saw."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import re
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops

from app.intake import IntakeLimits, open_document
from app.web.routes import STATIC_DIR
from tests.conftest import ServiceFactory
from tests.support.documents import make_image, make_pdf, page_id_of

KEY = "web-test-key"
DATA_URL = "data:image/png;base64,"
LIMITS = IntakeLimits(max_image_pixels=80_000_000)


def render(url: str, data: bytes, key: str | None = KEY, **fields: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/web/render", files={"file": ("doc", data)}, data=fields, headers=headers, timeout=60)


def decoded(page: dict[str, Any]) -> Image.Image:
    url: str = page["image"]
    assert url.startswith(DATA_URL)
    png = base64.b64decode(url.removeprefix(DATA_URL), validate=True)
    return Image.open(io.BytesIO(png)).convert("RGB")  # gray pages come as 8-bit L


def assert_same_pixels(data: bytes, pages: list[dict[str, Any]], password: str | None = None) -> None:
    """Each rendered page decodes to exactly what intake hands the engine."""
    document = open_document(data, limits=LIMITS, password=password)
    try:
        for page in pages:
            expected = document.render(page["page"] - 1)
            got = decoded(page)
            assert got.size == expected.size == (page["width"], page["height"])
            assert ImageChops.difference(got, expected).getbbox() is None, f"page {page['page']} differs"
    finally:
        document.close()


@pytest.fixture
def keyed(vllm_service: ServiceFactory) -> str:
    return vllm_service(api_keys=KEY)


def test_page_and_assets_load_without_a_key_everything_else_needs_one(keyed: str) -> None:
    page = httpx.get(f"{keyed}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>LightOnOCR</title>" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "object-src 'none'" in policy

    assets = {
        "/static/app.js": "text/javascript",
        "/static/app.css": "text/css",
        "/static/vendor/markdown-it/markdown-it.umd.min.js": "text/javascript",
        "/static/vendor/katex/katex.min.js": "text/javascript",
        "/static/vendor/katex/katex.min.css": "text/css",
        "/static/vendor/katex/fonts/KaTeX_Main-Regular.woff2": "font/woff2",
        "/static/vendor/dompurify/purify.min.js": "text/javascript",
    }
    for path, content_type in assets.items():
        response = httpx.get(keyed + path)
        assert response.status_code == 200, path
        # Python before 3.12 may map .js to application/javascript; both are right.
        assert response.headers["content-type"].split(";")[0] in {content_type, "application/javascript"}, path
    # Every asset the page references is there.
    for reference in ("static/app.js", "static/app.css", "static/vendor/katex/katex.min.css"):
        assert reference in page.text

    for method, path in [("GET", "/info"), ("POST", "/web/render"), ("POST", "/api/inference"), ("POST", "/")]:
        response = httpx.request(method, keyed + path)
        assert response.status_code in (401, 405), path
        if path != "/":
            assert response.json()["error"]["code"] == "unauthorized"
    for sneaky in ("/static/../info", "/static/%2e%2e/info", "/static/..%2finfo"):
        assert raw_get(keyed, sneaky)[0] == 404, sneaky  # nothing outside /static is reached without a key


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (httpx would normalise the dots away)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_render_pdf_pages_are_the_pixels_the_model_saw(keyed: str) -> None:
    pdf = make_pdf(3, (200, 260))
    response = render(keyed, pdf, pages="2-3")
    assert response.status_code == 200, response.text
    pages = response.json()["pages"]
    assert [page["page"] for page in pages] == [2, 3]
    assert [page_id_of(decoded(page)) for page in pages] == [2, 3]
    assert_same_pixels(pdf, pages)


def test_render_images_apply_intake_not_the_raw_file(keyed: str) -> None:
    # Why the page asks the server even for images: EXIF rotation, downscaling and TIFF
    # frames are applied by intake; the raw file is not what the model saw.
    jpeg = make_image("JPEG", 1800, 2400, page_id=7, exif_orientation=6)
    pages = render(keyed, jpeg).json()["pages"]
    assert [(page["page"], page["width"], page["height"]) for page in pages] == [(1, 1155, 1540)]
    assert page_id_of(decoded(pages[0])) == 7
    assert_same_pixels(jpeg, pages)

    tiff = make_image("TIFF", 300, 400, page_id=1, frames=3)
    pages = render(keyed, tiff, pages="3").json()["pages"]
    assert [page_id_of(decoded(page)) for page in pages] == [3]
    assert_same_pixels(tiff, pages)


def test_render_encrypted_pdf_needs_its_password(keyed: str) -> None:
    pdf = make_pdf(2, (200, 260), password="s3cret")
    assert render(keyed, pdf).json()["error"]["code"] == "password_required"
    assert render(keyed, pdf, password="nope").json()["error"]["code"] == "wrong_password"
    response = render(keyed, pdf, password="s3cret")
    assert response.status_code == 200
    assert_same_pixels(pdf, response.json()["pages"], password="s3cret")


@pytest.mark.parametrize(
    ("settings", "data", "fields", "status", "code"),
    [
        ({"max_file_size_mb": 0.001}, make_pdf(1), {}, 413, "file_too_large"),
        ({"max_pages": 2}, make_pdf(3, (200, 260)), {}, 422, "too_many_pages"),
        ({}, make_pdf(3, (200, 260)), {"pages": "4"}, 422, "invalid_pages"),
        ({"max_image_pixels": 1000}, make_image("PNG", 100, 100), {}, 422, "image_too_large"),
        ({}, b"not a document at all", {}, 415, "unsupported_media_type"),
        ({}, b"", {}, 422, "empty_document"),
    ],
)
def test_render_enforces_the_inference_limits(
    vllm_service: ServiceFactory, settings: dict[str, Any], data: bytes, fields: dict[str, str], status: int, code: str
) -> None:
    url = vllm_service(**settings)
    response = render(url, data, key=None, **fields)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_render_without_a_file_is_refused(vllm_service: ServiceFactory) -> None:
    url = vllm_service()
    response = httpx.post(f"{url}/web/render", files={"pages": (None, "1")})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "missing_file")


def test_vendored_files_match_vendor_md() -> None:
    """Every vendored file is listed in VENDOR.md with its sha256, and nothing else is there."""
    vendor = STATIC_DIR / "vendor"
    sums = re.findall(r"^([0-9a-f]{64})  \./(\S+)$", (vendor / "VENDOR.md").read_text(), re.MULTILINE)
    listed = {path: digest for digest, path in sums}
    present = {str(path.relative_to(vendor)) for path in vendor.rglob("*") if path.is_file()} - {"VENDOR.md"}
    assert set(listed) == present
    for path, digest in listed.items():
        assert hashlib.sha256((vendor / path).read_bytes()).hexdigest() == digest, path
