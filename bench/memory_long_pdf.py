"""Peak RSS of the service serving one long PDF: set by the in-flight window, not by page count.

    uv run python -m bench.memory_long_pdf [--pages 30 100 300] [--concurrency 64]

Starts bench.simulator (fast: short outputs, x10 speed), then for each page count a fresh
Python process that builds the service in-process (`create_app`, MODEL_SOURCE=vllm,
MAX_PAGES raised to the count), serves it on loopback, POSTs one synthetic PDF of that many
US-Letter pages (each rendered page is a 1190x1540 RGB image, 5.5 MB) and reports its RSS
before the request and its peak (ru_maxrss) after. Every page is checked to come back ok.
With intake workers (`--intake-workers N`, default: the service's default, one per usable core) each
worker's peak RSS (VmHWM) is read too, and "total" is the service's peak plus every worker's peak (an
upper bound: the peaks need not coincide). `--intake-workers 0` is intake in the service's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx

from bench.common import peak_rss_mib, print_header, print_table
from bench.service_vs_direct import MODEL, free_port, process, wait_for


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_of(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(pages: int, sim_url: str, concurrency: int, intake_workers: int | None) -> None:
    """One measurement, in its own process so ru_maxrss starts fresh."""
    from app.main import create_app
    from app.settings import load_settings
    from tests.support.documents import make_pdf
    from tests.support.server import ServedApp

    settings = load_settings(
        _env_file=None,
        model_source="vllm",
        model_name=MODEL,
        vllm_base_url=sim_url,
        max_concurrent_pages=concurrency,
        max_pages=pages,
        max_new_tokens=1024,
        intake_workers=intake_workers,
    )
    pdf = make_pdf(pages)
    app = create_app(settings)
    with ServedApp(app) as served:
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.url}/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("service not ready")
            time.sleep(0.05)
        before = current_rss_mib()
        started = time.perf_counter()
        response = httpx.post(
            f"{served.url}/api/inference", files={"file": ("long.pdf", pdf, "application/pdf")}, timeout=900
        )
        elapsed = time.perf_counter() - started
        body = response.json()
        ok = response.status_code == 200 and len(body["pages"]) == pages
        ok = ok and all(page["status"] == "ok" for page in body["pages"])
        del body, response
        pool = app.state.service.intake
        workers = [peak_rss_of(pid) for pid in pool.pids()] if pool is not None else []
    print(
        json.dumps(
            {
                "pages": pages,
                "ok": ok,
                "rss_before_mib": before,
                "peak_rss_mib": peak_rss_mib(),
                "worker_peaks_mib": workers,
                "seconds": elapsed,
                "pdf_mb": len(pdf) / 1e6,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--intake-workers", type=int, help="INTAKE_WORKERS (default: the service's, usable cores)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sim-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.sim_url, args.concurrency, args.intake_workers)
        return

    print_header(f"peak RSS serving one long PDF, MAX_CONCURRENT_PAGES={args.concurrency}")
    malloc = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    print(f"allocator env (glibc): {malloc or 'defaults'}")
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}/v1"
    simulator = [sys.executable, "-m", "bench.simulator", "--port", str(port), "--speed", "10", "--tokens-mean", "100"]
    rows: list[list[object]] = []
    with process(simulator) as sim:
        wait_for(f"{sim_url}/models", sim)
        for pages in args.pages:
            command = [sys.executable, "-m", "bench.memory_long_pdf", "--child", str(pages), "--sim-url", sim_url]
            command += ["--concurrency", str(args.concurrency)]
            if args.intake_workers is not None:
                command += ["--intake-workers", str(args.intake_workers)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append(
                [
                    pages,
                    result["ok"],
                    round(result["rss_before_mib"]),
                    round(result["peak_rss_mib"]),
                    round(result["peak_rss_mib"] - result["rss_before_mib"]),
                    "/".join(str(round(peak)) for peak in result["worker_peaks_mib"]) or "-",
                    round(result["peak_rss_mib"] + sum(result["worker_peaks_mib"])),
                    result["seconds"],
                ]
            )
    print(f"intake workers: {'service default' if args.intake_workers is None else args.intake_workers}")
    print_table(
        [
            "pages",
            "all ok",
            "RSS before MiB",
            "peak RSS MiB",
            "peak - before MiB",
            "worker peaks MiB",
            "total MiB",
            "seconds",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
