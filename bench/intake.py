"""Intake cost per page: render, normalise and PNG-encode every corpus page, naive path vs the service's.

    uv run python -m bench.intake [--repeat 3] [--corpus ../shared/corpus]

(a) naive: the reference pipeline as REFERENCE.md writes it. PDFs: pypdfium2 render at
    min(200/72, 1540/longest side) + to_pil, convert("RGB"), Pillow PNG at its default level.
    Images: open + decode, RGB, EXIF orientation, LANCZOS to <= 1540, Pillow PNG.
(b) service: `PdfDocument.render` / `ImageDocument.frame` + `normalise_image`, then
    `app.imaging.encode_png` (what the vLLM engine sends).

Times are CPU milliseconds of the measuring thread (`time.thread_time`), i.e. per page per
core; each page is measured `--repeat` times (document reopened each time, so PDFium's caches
do not help) and its fastest run kept, then median and p90 over pages are printed. Every
service PNG is decoded and checked against the naive RGB image pixel for pixel.

A second table compares PNG encoders on the service's images: time, bytes (they cross the
network as base64) and decode time (what vLLM pays to read the page back).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image, ImageOps

from app.imaging import FILTER_NONE, FILTER_UP, deflate_isal, deflate_zlib, encode_png, is_gray, write_png
from app.intake.document import ImageDocument, IntakeLimits, PdfDocument, fit_to_model, normalise_image, pdf_scale
from app.intake.sniff import DocType, sniff
from bench.common import CORPUS, cpu_ms, median, percentile, print_header, print_table

LIMITS = IntakeLimits(max_image_pixels=200_000_000)
STAGES = ("render", "normalise", "encode")


@dataclass
class PageTimes:
    """Fastest run of each stage for one page, in CPU ms."""

    name: str
    naive: dict[str, float] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)


def corpus_pages(corpus: Path) -> list[tuple[str, bytes, int]]:
    """(name, bytes, page count) of each manifest document present; absent ones are skipped with a note."""
    manifest = corpus / "manifest.json"
    if not manifest.exists():
        sys.exit(f"no corpus at {corpus}")
    found = []
    for entry in json.loads(manifest.read_text())["documents"]:
        path = corpus / entry["file"]
        if not path.exists():
            print(f"skipped (absent): {entry['file']}")
            continue
        found.append((entry["file"], path.read_bytes(), int(entry["pages"])))
    return found


def naive_pdf(data: bytes, index: int) -> tuple[Image.Image, dict[str, float]]:
    pdf = pdfium.PdfDocument(data)
    page = pdf[index]
    raw, render = cpu_ms(lambda: page.render(scale=pdf_scale(*page.get_size())).to_pil())
    rgb, normalise = cpu_ms(lambda: raw.convert("RGB"))
    page.close()
    pdf.close()
    return rgb, {"render": render, "normalise": normalise}


def naive_image(data: bytes, index: int) -> tuple[Image.Image, dict[str, float]]:
    def decode() -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.seek(index)
        image.load()
        return image

    def normalise(image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")  # the corpus has no alpha; app.intake.to_rgb flattens it when there is
        return fit_to_model(ImageOps.exif_transpose(rgb))

    image, render = cpu_ms(decode)
    rgb, took = cpu_ms(lambda: normalise(image))
    return rgb, {"render": render, "normalise": took}


def service_page(data: bytes, index: int) -> tuple[Image.Image, dict[str, float]]:
    if sniff(data) is DocType.PDF:
        document = PdfDocument(data, password=None, limits=LIMITS)
        image, render = cpu_ms(lambda: document.render(index))
        document.close()
        return image, {"render": render, "normalise": 0.0}  # PDFium renders RGB at the final size
    images = ImageDocument(data, doc_type=sniff(data), limits=LIMITS)
    frame, render = cpu_ms(lambda: images.frame(index))
    image, normalise = cpu_ms(lambda: normalise_image(frame))
    images.close()
    return image, {"render": render, "normalise": normalise}


def pillow_png(image: Image.Image, **options: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def gray_or_rgb(image: Image.Image) -> Image.Image:
    return image.getchannel(0) if is_gray(image) else image


ENCODERS: dict[str, Callable[[Image.Image], bytes]] = {
    "Pillow RGB level 6 (default, naive)": pillow_png,
    "Pillow RGB level 1": lambda image: pillow_png(image, compress_level=1),
    "Pillow gray/RGB level 1": lambda image: pillow_png(gray_or_rgb(image), compress_level=1),
    "Pillow gray/RGB level 1 Z_RLE": lambda image: pillow_png(gray_or_rgb(image), compress_level=1, compress_type=3),
    "ours gray/RGB none, zlib level 1": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_NONE, deflate=deflate_zlib(1, zlib.Z_DEFAULT_STRATEGY)
    ),
    "ours gray/RGB none, level 1 Z_RLE": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_NONE, deflate=deflate_zlib(1, zlib.Z_RLE)
    ),
    "ours gray/RGB up, level 1": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_UP, deflate=deflate_zlib(1, zlib.Z_DEFAULT_STRATEGY)
    ),
    "ours gray/RGB up, level 1 Z_RLE": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_UP, deflate=deflate_zlib(1, zlib.Z_RLE)
    ),
    "ours gray/RGB up, level 6": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_UP, deflate=deflate_zlib(6, zlib.Z_DEFAULT_STRATEGY)
    ),
    "ours gray/RGB up, ISA-L level 1": lambda image: write_png(
        gray_or_rgb(image), png_filter=FILTER_UP, deflate=deflate_isal
    ),
    "encode_png (service: gray/RGB none, ISA-L level 1)": encode_png,
}


def decode_rgb(png: bytes) -> Image.Image:
    """What vLLM does with the data URL: open and convert to RGB."""
    return Image.open(io.BytesIO(png)).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per page; the fastest is kept")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--skip-encoders", action="store_true", help="only the naive vs service table")
    args = parser.parse_args()

    print_header("intake cost per page (CPU ms per page per core)")
    documents = corpus_pages(args.corpus)
    pages: list[PageTimes] = []
    finals: list[Image.Image] = []
    identical = 0
    for name, data, count in documents:
        is_pdf = sniff(data) is DocType.PDF
        for index in range(count):
            times = PageTimes(f"{name}#{index + 1}")
            reference: Image.Image | None = None
            final: Image.Image | None = None
            for _ in range(args.repeat):
                reference, naive = naive_pdf(data, index) if is_pdf else naive_image(data, index)
                _, naive["encode"] = cpu_ms(lambda image=reference: pillow_png(image))  # type: ignore[misc]
                final, service = service_page(data, index)
                png, service["encode"] = cpu_ms(lambda image=final: encode_png(image))  # type: ignore[misc]
                for stage in STAGES:
                    times.naive[stage] = min(times.naive.get(stage, float("inf")), naive[stage])
                    times.service[stage] = min(times.service.get(stage, float("inf")), service[stage])
            assert reference is not None
            assert final is not None
            same = decode_rgb(png).tobytes() == reference.tobytes() and final.size == reference.size
            identical += same
            pages.append(times)
            finals.append(final)

    rows: list[list[object]] = []
    for path_name in ("naive", "service"):
        row: list[object] = [path_name]
        per_page: list[dict[str, float]] = [getattr(page, path_name) for page in pages]
        for stage in STAGES:
            values = [times[stage] for times in per_page]
            row += [median(values), percentile(values, 90)]
        totals = [sum(times.values()) for times in per_page]
        row += [median(totals), percentile(totals, 90)]
        rows.append(row)
    headers = ["path"] + [f"{stage} {stat}" for stage in (*STAGES, "total") for stat in ("median", "p90")]
    print(f"pages: {len(pages)}; service PNG decodes to the naive RGB image: {identical}/{len(pages)}")
    print_table(headers, rows)
    print()
    print_table(
        ["page", "naive render", "naive norm", "naive enc", "service render", "service norm", "service enc"],
        [[page.name, *page.naive.values(), *page.service.values()] for page in pages],
    )
    if args.skip_encoders:
        return

    print()
    print("PNG encoders on the service's images (fastest of --repeat runs per page; decode = open + RGB):")
    encoder_rows: list[list[object]] = []
    for label, encoder in ENCODERS.items():
        encode_ms: list[float] = []
        decode_ms: list[float] = []
        sizes: list[int] = []
        for image in finals:
            best_encode = best_decode = float("inf")
            png = b""
            for _ in range(args.repeat):
                png, took = cpu_ms(lambda image=image, encoder=encoder: encoder(image))  # type: ignore[misc]
                best_encode = min(best_encode, took)
                decoded, took = cpu_ms(lambda png=png: decode_rgb(png))  # type: ignore[misc]
                best_decode = min(best_decode, took)
            if decoded.tobytes() != image.tobytes():
                raise AssertionError(f"{label} is not lossless")
            encode_ms.append(best_encode)
            decode_ms.append(best_decode)
            sizes.append(len(png))
        encoder_rows.append(
            [
                label,
                median(encode_ms),
                percentile(encode_ms, 90),
                round(median(sizes) / 1024),
                round(sum(sizes) / 1024),
                median(decode_ms),
            ]
        )
    print_table(["encoder", "encode median", "encode p90", "KiB median", "KiB total", "decode median"], encoder_rows)


if __name__ == "__main__":
    main()
