"""Pages/s of the service (vllm engine) against a bare client, both driving bench.simulator.

    uv run python -m bench.service_vs_direct [--concurrency 64] [--speed 4] [--rounds 2] [--source synthetic|corpus]

Three processes on loopback: the simulator, the service (`uvicorn app.main:app`,
MODEL_SOURCE=vllm, MAX_CONCURRENT_PAGES=--concurrency) and this script.
(a) direct: an asyncio httpx client POSTs the same PNGs the service would send (pre-rendered
    with the service's intake and `encode_png`, so the simulator draws the same output lengths)
    with at most --concurrency in flight; nothing else.
(b) the service fed one 100-page PDF, then 10 concurrent 10-page PDFs (the same 100 pages).
Each round measures all three back to back; the ratio (b)/(a) is within the round. Target: >= 0.97.
`--source corpus` builds the 100 pages from ../shared/corpus PDFs (scans: costlier to render).
`--endpoints N` starts N simulators (a fleet): the direct client spreads pages over them round robin,
`--concurrency` in flight on each, and the service gets them all in VLLM_BASE_URL (MAX_CONCURRENT_PAGES
each). "service CPU ms/page" is the service process's own CPU time (/proc/PID/stat utime + stime; intake
workers are not its children's time) over the 1x100 and 10x10 runs, per page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pypdfium2 as pdfium

from app.imaging import encode_png, png_data_url
from app.intake import IntakeLimits, open_document
from bench.common import CORPUS, print_header, print_table
from tests.support.documents import make_pdf

MODEL = "lightonai/LightOnOCR-2-1B"
PAGES = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g}s")


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # graceful: lets cProfile (--profile) write its file
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def hundred_page_pdf(source: str) -> bytes:
    if source == "synthetic":
        return make_pdf(PAGES)
    out = pdfium.PdfDocument.new()
    sources = [pdfium.PdfDocument(path.read_bytes()) for path in sorted(CORPUS.glob("*.pdf"))]
    if not sources:
        sys.exit(f"no PDFs in {CORPUS}")
    while len(out) < PAGES:
        for src in sources:
            for index in range(len(src)):
                if len(out) < PAGES:
                    out.import_pages(src, [index])
    return save(out)


def save(pdf: pdfium.PdfDocument) -> bytes:
    path = Path(f"/tmp/bench-svd-{os.getpid()}.pdf")
    pdf.save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def split(data: bytes, parts: int) -> list[bytes]:
    """`parts` PDFs holding consecutive slices of `data`'s pages."""
    src = pdfium.PdfDocument(data)
    size = len(src) // parts
    pieces = []
    for part in range(parts):
        piece = pdfium.PdfDocument.new()
        piece.import_pages(src, list(range(part * size, (part + 1) * size)))
        pieces.append(save(piece))
    return pieces


def prerender(data: bytes) -> list[bytes]:
    document = open_document(data, limits=IntakeLimits(max_image_pixels=100_000_000))
    try:
        return [encode_png(document.render(index)) for index in range(document.page_count)]
    finally:
        document.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (its own threads; not its children's)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def direct_fleet(base_urls: list[str], pngs: list[bytes], concurrency: int, max_tokens: int) -> float:
    """Wall seconds for a minimal client spreading pages round robin over `base_urls`, `concurrency` in flight each."""
    if len(base_urls) == 1:
        return await direct(base_urls[0], pngs, concurrency, max_tokens)
    shares = [pngs[index :: len(base_urls)] for index in range(len(base_urls))]
    started = time.perf_counter()
    await asyncio.gather(
        *(direct(url, share, concurrency, max_tokens) for url, share in zip(base_urls, shares, strict=True))
    )
    return time.perf_counter() - started


async def direct(base_url: str, pngs: list[bytes], concurrency: int, max_tokens: int) -> float:
    """Wall seconds for a minimal client to get every page answered, `concurrency` in flight."""
    bodies = [
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(png)}}]}],
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": max_tokens,
        }
        for png in pngs
    ]
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as client:

        async def one(body: dict[str, Any]) -> None:
            async with semaphore:
                response = await client.post("/chat/completions", json=body)
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started


async def through_service(service_url: str, pdfs: list[bytes]) -> float:
    """Wall seconds for the service to answer all `pdfs`, sent at once."""
    async with httpx.AsyncClient(base_url=service_url, timeout=900) as client:

        async def one(data: bytes) -> int:
            response = await client.post("/api/inference", files={"file": ("doc.pdf", data, "application/pdf")})
            if response.status_code != 200:
                raise RuntimeError(f"service answered {response.status_code}: {response.text[:300]}")
            pages: list[dict[str, Any]] = response.json()["pages"]
            if any(page.get("status", "ok") != "ok" for page in pages):
                raise RuntimeError(f"pages not ok: {[page.get('status') for page in pages]}")
            return len(pages)

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(data) for data in pdfs))
        elapsed = time.perf_counter() - started
    if sum(counts) != PAGES:
        raise RuntimeError(f"expected {PAGES} pages, got {sum(counts)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--speed", type=float, default=4.0, help="simulator speed-up (see bench.simulator)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", choices=["synthetic", "corpus"], default="synthetic")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument(
        "--without-blocks",
        action="store_true",
        help="diagnostic: the service skips markdown block parsing (patched in its process), to size that cost",
    )
    parser.add_argument("--profile", type=Path, help="run the service under cProfile, stats written here")
    parser.add_argument("--service-workers-env", default="", help="extra env for the service, K=V,K=V")
    parser.add_argument("--endpoints", type=int, default=1, help="simulated vLLM servers (a fleet)")
    args = parser.parse_args()

    print_header(f"service vs direct client, {args.concurrency} in flight, simulator speed x{args.speed:g}")
    pdf = hundred_page_pdf(args.source)
    pieces = split(pdf, 10)
    pngs = prerender(pdf)
    png_mb = sum(map(len, pngs)) / 1e6
    print(f"source={args.source}: PDF {len(pdf) / 1e6:.1f} MB, PNG {png_mb:.1f} MB for {PAGES} pages")

    sim_ports, service_port = [free_port() for _ in range(args.endpoints)], free_port()
    sim_urls = [f"http://127.0.0.1:{port}/v1" for port in sim_ports]
    service_env = {
        "MODEL_SOURCE": "vllm",
        "MODEL_NAME": MODEL,
        "VLLM_BASE_URL": ",".join(sim_urls),
        "MAX_CONCURRENT_PAGES": str(args.concurrency),
        "MAX_NEW_TOKENS": str(args.max_tokens),
        "MAX_FILE_SIZE_MB": str(max(10, 2 * len(pdf) // 1_000_000 + 1)),
        "MAX_PAGES": str(PAGES),
    }
    for pair in filter(None, args.service_workers_env.split(",")):
        key, _, value = pair.partition("=")
        service_env[key] = value
    print(f"service env: {service_env}")
    python = sys.executable
    simulators = [
        [python, "-m", "bench.simulator", "--port", str(port), "--speed", str(args.speed)] for port in sim_ports
    ]
    profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
    service = [python, *profile, "-m", "uvicorn", "app.main:app", "--port", str(service_port), "--log-level", "warning"]
    if args.without_blocks:
        patch = (
            "import sys, uvicorn, app.service as s; s.parse_blocks = lambda text, page: []; "
            "sys.argv = ['uvicorn', *sys.argv[1:]]; uvicorn.main()"
        )
        service = [python, "-c", patch, "app.main:app", "--port", str(service_port), "--log-level", "warning"]
    rows: list[list[object]] = []
    with contextlib.ExitStack() as stack:
        sim_procs = [stack.enter_context(process(command)) for command in simulators]
        service_proc = stack.enter_context(process(service, service_env))
        for url, sim_proc in zip(sim_urls, sim_procs, strict=True):
            wait_for(f"{url}/models", sim_proc)
        service_url = f"http://127.0.0.1:{service_port}"
        wait_for(f"{service_url}/ready", service_proc)
        asyncio.run(direct_fleet(sim_urls, pngs[:8], args.concurrency, args.max_tokens))  # warm connections
        for round_ in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            direct_s = asyncio.run(direct_fleet(sim_urls, pngs, args.concurrency, args.max_tokens))
            cpu = cpu_seconds(service_proc.pid)
            one_s = asyncio.run(through_service(service_url, [pdf]))
            ten_s = asyncio.run(through_service(service_url, pieces))
            cpu = cpu_seconds(service_proc.pid) - cpu
            in_flight = [httpx.get(url.removesuffix("/v1") + "/stats").json()["max_in_flight"] for url in sim_urls]
            rows.append(
                [
                    round_,
                    PAGES / direct_s,
                    PAGES / one_s,
                    PAGES / ten_s,
                    direct_s / one_s,
                    direct_s / ten_s,
                    round(1000 * cpu / (2 * PAGES), 2),
                    "/".join(map(str, in_flight)),
                    load,
                    os.getloadavg()[0],
                ]
            )
    print_table(
        [
            "round",
            "(a) direct pages/s",
            "(b) 1x100 pages/s",
            "(b) 10x10 pages/s",
            "1x100 / direct",
            "10x10 / direct",
            "service CPU ms/page",
            "sim max in flight",
            "load 1m before",
            "load 1m after",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
