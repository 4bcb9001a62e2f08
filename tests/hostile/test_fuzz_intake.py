"""Property-based fuzzing of intake: mutated real documents never crash, never hang.

Seeds are small generated documents of every supported type (and, when present, the
corpus documents, read only and mutated in memory). Each example applies 1-4 mutations
(bit flips, truncation, insertion of hostile tokens, duplication of a chunk), biased
towards the first and last 2 KiB where headers, IFDs, xref tables and trailers live.

Property: `open_document` and `render` of the pages raise nothing but `OCRError`s with
a status below 500, and each example finishes within 10 s (run in a thread of its own,
so a hang fails the example instead of the suite). Pages past the eighth are sampled
(the last one), since a mutated /Count can claim a million pages and MAX_PAGES refuses
those anyway. A few examples go through HTTP to check the same holds end to end.

Deterministic: `derandomize=True` and no example database, so CI runs the same examples
every time; the whole file runs in well under a minute on 2 shared cores.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import OCRError
from app.intake import IntakeLimits, open_document
from app.intake.document import LONGEST_EDGE
from app.main import create_app
from tests.conftest import CORPUS, make_settings, wait_ready
from tests.support.documents import make_image, make_pdf
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp

LIMITS = IntakeLimits(max_image_pixels=80_000_000)  # the default MAX_IMAGE_PIXELS
EXAMPLE_TIMEOUT_S = 10.0
RENDER_AT_MOST = 8
EDGE = 2048  # bytes at each end that mutations favour

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

HOSTILE_TOKENS = (
    b"\x00" * 8,
    b"\xff" * 8,
    b"0",
    b"-1",
    b"4294967295",
    b"99999999999999999999",
    b"1e308",
    b"%PDF-1.7\n",
    b"%%EOF\n",
    b" obj\n",
    b"endobj\n",
    b"stream\n",
    b"endstream\n",
    b"xref\n0 1\n",
    b"trailer\n<< /Root 1 0 R >>\n",
    b"/Count 1000000 ",
    b"/Kids [2 0 R] ",
    b"/Length 999999999 ",
    b"/Filter /FlateDecode ",
    b"<< << << << << << << <<",
    b"[[[[[[[[[[[[[[[[",
    b"IDAT",
    b"IEND",
    b"\xff\xd9",
    b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff",
)


# ----------------------------------------------------------------------------- seeds


@cache
def generated_seeds() -> tuple[bytes, ...]:
    """One small document per supported type, multi-page where the type allows it."""
    return (
        make_pdf(3, page_size_pt=(144, 192)),
        make_pdf(1, page_size_pt=(144, 192), password="pw"),
        make_image("PNG", 90, 120, page_id=1),
        make_image("PNG", 90, 120, page_id=2, mode="P"),
        make_image("PNG", 90, 120, alpha=True),
        make_image("JPEG", 90, 120, page_id=3, exif_orientation=6),
        make_image("TIFF", 60, 80, frames=3),
        make_image("GIF", 60, 80, frames=2),
        make_image("WEBP", 60, 80, page_id=4),
        make_image("BMP", 60, 80, page_id=5),
    )


@cache
def corpus_seeds() -> tuple[bytes, ...]:
    """Corpus inputs under 1 MB (bigger ones only slow the examples down), read only."""
    if not CORPUS.is_dir():
        return ()
    paths = sorted(p for p in CORPUS.iterdir() if p.suffix in (".pdf", ".png", ".jpg") and p.stat().st_size < 1 << 20)
    return tuple(path.read_bytes() for path in paths)


# ----------------------------------------------------------------------------- mutations


@st.composite
def positions(draw: st.DrawFn, size: int) -> int:
    """A position in [0, size), favouring the head and the tail."""
    last = size - 1
    return draw(
        st.one_of(
            st.integers(0, min(last, EDGE)),
            st.integers(max(0, last - EDGE), last),
            st.integers(0, last),
        )
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for operation in draw(
        st.lists(st.sampled_from(["flip", "truncate", "insert", "duplicate"]), min_size=1, max_size=4)
    ):
        if not data:
            break
        at = draw(positions(len(data)))
        if operation == "flip":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(positions(len(data)))] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[at:]
        elif operation == "insert":
            token = draw(st.one_of(st.sampled_from(HOSTILE_TOKENS), st.binary(min_size=1, max_size=32)))
            data[at:at] = token
        else:
            length = draw(st.integers(1, 4096))
            data[draw(positions(len(data))) : draw(positions(len(data)))] = data[at : at + length]
    return bytes(data)


# ----------------------------------------------------------------------------- the property


def pages_to_render(count: int) -> list[int]:
    return sorted({*range(min(count, RENDER_AT_MOST)), count - 1}) if count > 0 else []


def exercise(data: bytes) -> None:
    """Open and render as the service does; only client errors (OCRError < 500) may come out."""
    try:
        document = open_document(data, limits=LIMITS)
    except OCRError as exc:
        require_client_error(exc)
        return
    try:
        for index in pages_to_render(document.page_count):
            try:
                image = document.render(index)
            except OCRError as exc:
                require_client_error(exc)
                continue
            assert image.mode == "RGB"
            assert min(image.size) >= 1
            assert max(image.size) <= LONGEST_EDGE
    finally:
        document.close()


def require_client_error(exc: OCRError) -> None:
    if exc.status >= 500:
        raise AssertionError(f"intake raised a server error: {exc.status} {exc.code}: {exc.message}")


def bounded(function: Callable[[bytes], None], data: bytes) -> None:
    """Run in a thread of its own: a hang fails this example after EXAMPLE_TIMEOUT_S."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about the damage it tolerates
                function(data)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="fuzz-example", daemon=True)
    thread.start()
    thread.join(EXAMPLE_TIMEOUT_S)
    if thread.is_alive():
        raise AssertionError(f"intake did not finish within {EXAMPLE_TIMEOUT_S:g}s ({len(data)} bytes)")
    if failure:
        raise failure[0]


@settings(FUZZ, max_examples=1000)
@given(data=mutated(generated_seeds()))
def test_mutated_documents_only_raise_client_errors(data: bytes) -> None:
    bounded(exercise, data)


@pytest.mark.skipif(not corpus_seeds(), reason="../shared/corpus not present")
@settings(FUZZ, max_examples=200)
@given(data=st.deferred(lambda: mutated(corpus_seeds())))
def test_mutated_corpus_documents_only_raise_client_errors(data: bytes) -> None:
    bounded(exercise, data)


# ----------------------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    with StubVLLM() as stub:
        values: dict[str, Any] = {"model_source": "vllm", "vllm_base_url": stub.base_url, "vllm_retry_backoff_s": 0.01}
        with ServedApp(create_app(make_settings(**values))) as served:
            wait_ready(served.url, timeout=30)
            yield served.url


@settings(FUZZ, max_examples=40)
@given(data=mutated(generated_seeds()))
def test_mutated_documents_over_http_get_a_clean_answer(service_url: str, data: bytes) -> None:
    response = httpx.post(f"{service_url}/api/inference", files={"file": ("doc", data)}, timeout=EXAMPLE_TIMEOUT_S)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["status"] in ("ok", "partial")
    else:
        assert set(body) == {"error"}
        assert body["error"]["code"]


def test_seeds_are_readable() -> None:
    """The fuzz starts from documents that work: each seed opens and renders unmutated."""
    for seed in generated_seeds():
        document = open_document(seed, limits=LIMITS, password="pw" if b"/Encrypt" in seed else None)
        try:
            assert isinstance(document.render(0), Image.Image)
        finally:
            document.close()
