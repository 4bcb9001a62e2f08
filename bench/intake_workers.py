"""Intake throughput with worker processes: pages/s with 0 (threads), 1 and 2 workers, and main-process CPU.

    uv run python -m bench.intake_workers [--workers 0 1 2] [--rounds 4] [--in-flight 8]

Every corpus page (../shared/corpus: PDFs of 200-dpi scans, PNG and JPEG scans) is rendered,
normalised and PNG-encoded as the vLLM engine sends it (padded to 28 px), `--rounds` times over,
with `--in-flight` pages requested at once (as the service's scheduler does). Each round opens
each document once, as a request does.

- workers 0: today's in-process path (`open_document` + `render` + `encode_png` in threads; PDFium
  is serialised by its lock, so one core at most for PDFs);
- workers N: `IntakePool(N)` (app/intake/pool.py), the document written once and rendered by the workers.

Reported: wall pages/s, speed-up over 1 worker, and the main process's CPU ms per page
(`time.process_time`, all its threads; the workers' CPU is not in it): the cost of feeding the
workers, which must stay small for one event loop to feed many cores. Pool start-up is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from app.imaging import encode_png
from app.intake import IntakeLimits, open_document
from app.intake.document import pad_to_min_side
from app.intake.pool import IntakePool
from bench.common import CORPUS, print_header, print_table

LIMITS = IntakeLimits(max_image_pixels=200_000_000)
MIN_SIDE = 28


def corpus_documents(corpus: Path) -> list[bytes]:
    paths = sorted(path for path in corpus.iterdir() if path.suffix.lower() in (".pdf", ".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no corpus documents in {corpus}")
    return [path.read_bytes() for path in paths]


def _threads_page(data: bytes, index: int) -> int:
    document = open_document(data, limits=LIMITS)
    try:
        return len(encode_png(pad_to_min_side(document.render(index), MIN_SIDE)))
    finally:
        document.close()


async def run_threads(documents: list[bytes], rounds: int, in_flight: int) -> int:
    """In-process intake; a document is opened once per page here (the service opens it once, then renders
    pages from that one open document in threads; opening a PDF costs well under a millisecond)."""
    semaphore = asyncio.Semaphore(in_flight)
    counts = [open_document(data, limits=LIMITS).page_count for data in documents]

    async def one(data: bytes, index: int) -> None:
        async with semaphore:
            await asyncio.to_thread(_threads_page, data, index)

    jobs = [
        one(data, index)
        for _ in range(rounds)
        for data, count in zip(documents, counts, strict=True)
        for index in range(count)
    ]
    await asyncio.gather(*jobs)
    return len(jobs)


async def run_pool(pool: IntakePool, documents: list[bytes], rounds: int, in_flight: int) -> int:
    semaphore = asyncio.Semaphore(in_flight)
    pages = 0

    async def document_pages(data: bytes) -> int:
        document = await pool.open(data, limits=LIMITS)
        try:

            async def one(index: int) -> None:
                async with semaphore:
                    await document.page(index, png_min_side=MIN_SIDE)

            await asyncio.gather(*(one(index) for index in range(document.page_count)))
            return document.page_count
        finally:
            document.close()

    for _ in range(rounds):
        pages += sum(await asyncio.gather(*(document_pages(data) for data in documents)))
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    documents = corpus_documents(args.corpus)
    print_header(
        f"intake throughput, {len(documents)} corpus documents x {args.rounds} rounds, {args.in_flight} in flight"
    )
    rows: list[list[object]] = []
    one_worker: float | None = None
    for workers in args.workers:
        pool = IntakePool(workers) if workers > 0 else None
        if pool is not None:
            pool.start()
            asyncio.run(run_pool(pool, documents[:1], 1, args.in_flight))  # warm: forkserver, imports
        load = os.getloadavg()[0]
        cpu, wall = time.process_time(), time.perf_counter()
        if pool is None:
            pages = asyncio.run(run_threads(documents, args.rounds, args.in_flight))
        else:
            pages = asyncio.run(run_pool(pool, documents, args.rounds, args.in_flight))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if pool is not None:
            pool.close()
        rate = pages / wall
        if workers == 1:
            one_worker = rate
        speedup = f"{rate / one_worker:.2f}" if one_worker and workers > 0 else "-"
        label = "0 (threads)" if workers == 0 else str(workers)
        rows.append([label, pages, round(wall, 2), round(rate, 1), speedup, round(1000 * cpu / pages, 2), load])
    print_table(["workers", "pages", "seconds", "pages/s", "vs 1 worker", "main CPU ms/page", "load 1m at start"], rows)


if __name__ == "__main__":
    main()
