"""Load bench: many concurrent clients against the real service, backed by a faulty vLLM stand-in.

Run by hand (not part of the test suite):

    uv run python -m bench.load --clients 16 --minutes 10
    uv run python -m bench.load --clients 4 --minutes 0.5 --error-rate 0.05 --latency-ms 20-400

Three processes, so the service is measured alone:
- the stub vLLM (`python -m bench.load stub ...`): the strict OpenAI-protocol stand-in from
  `tests/support/openai_stub.py`, answering each page after a random latency and with an HTTP 5xx
  for `--error-rate` of page requests (the service's vLLM engine retries those, so most still succeed);
- the service (`python -m uvicorn app.main:app`, MODEL_SOURCE=vllm), whose RSS is sampled from /proc;
- this process: `--clients` asyncio clients, each posting a random small document (1-3 page PDF or a
  PNG) back to back until `--minutes` are up.

It prints requests sent, answers by HTTP status (and error code), lost requests (sent but never
answered with an HTTP status: must be 0), p50/p99 latency of 200s, and the service's RSS over time.
Exit status 1 when any request was lost or the service died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SMALL_PAGE_PT = (216, 288)  # 3 x 4 in: 600 x 800 px at 200 DPI


# --------------------------------------------------------------------------- the faulty stub


def run_stub(port: int, error_rate: float, latency_ms: tuple[float, float], seed: int) -> None:
    """Serve the strict stub with random latency and injected 5xx answers (blocks until SIGTERM)."""
    import signal

    from tests.support.openai_stub import Reply, StubRequest, StubVLLM, describe

    rng = random.Random(seed)

    def responder(request: StubRequest) -> Reply:
        delay = rng.uniform(*latency_ms) / 1000
        if rng.random() < error_rate:
            return Reply(status=rng.choice((500, 502, 503)), delay_s=delay / 4, message="injected failure")
        return Reply(text=describe(request.image), delay_s=delay)

    stub = StubVLLM(responder, port=port)
    print(f"stub vLLM at {stub.base_url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        stub.serve_forever()
    print(f"stub: completed={stub.completed} violations={len(stub.violations)}", flush=True)
    for violation in stub.violations[:10]:
        print(f"stub violation: {violation}", flush=True)


# --------------------------------------------------------------------------- the clients


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    pages_ok: int = 0
    page_statuses: Counter[str] = field(default_factory=Counter)


def documents(seed: int) -> list[tuple[str, bytes]]:
    """A fixed mix of small real documents: PDFs of 1-3 pages and PNG pages."""
    from tests.support.documents import make_pdf, make_png

    rng = random.Random(seed)
    docs = [(f"doc{n}.pdf", make_pdf(n, page_size_pt=SMALL_PAGE_PT)) for n in (1, 2, 3)]
    docs += [(f"page{i}.png", make_png(width=rng.randint(400, 900), height=rng.randint(400, 1100))) for i in range(3)]
    return docs


async def client(url: str, docs: list[tuple[str, bytes]], deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=30)) as http:
        while time.monotonic() < deadline:
            name, data = rng.choice(docs)
            tally.sent += 1
            started = time.perf_counter()
            try:
                response = await http.post("/api/inference", files={"file": (name, data)})
            except httpx.HTTPError as exc:
                tally.lost[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            label = str(response.status_code)
            if response.status_code == 200:
                tally.latencies.append(elapsed)
                body = response.json()
                label += f" {body['status']}"
                for page in body["pages"]:
                    tally.page_statuses[page["status"]] += 1
                    tally.pages_ok += page["status"] != "failed"
            else:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    label += f" {response.json()['error']['code']}"
            tally.statuses[label] += 1


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int, every_s: float, samples: list[tuple[float, float]], started: float) -> None:
    while True:
        value = rss_mb(pid)
        if value is not None:
            samples.append((time.monotonic() - started, value))
        await asyncio.sleep(every_s)


# --------------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: process exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def drive(args: argparse.Namespace, url: str, service_pid: int) -> tuple[Tally, list[tuple[float, float]]]:
    docs = documents(args.seed)
    tally = Tally()
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60
    sampler = asyncio.create_task(sample_rss(service_pid, args.rss_every_s, samples, started))
    try:
        await asyncio.gather(*(client(url, docs, deadline, tally, args.seed + i) for i in range(args.clients)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    if (value := rss_mb(service_pid)) is not None and (not samples or time.monotonic() - started - samples[-1][0] > 1):
        samples.append((time.monotonic() - started, value))
    return tally, samples


def report(args: argparse.Namespace, tally: Tally, samples: list[tuple[float, float]], elapsed: float) -> None:
    answered = sum(tally.statuses.values())
    lost = sum(tally.lost.values())
    print(f"\nclients={args.clients} minutes={args.minutes:g} error_rate={args.error_rate:g} "
          f"latency_ms={args.latency_ms} max_concurrent_pages={args.max_concurrent_pages}")  # fmt: skip
    print(f"elapsed_s={elapsed:.0f}")
    print("| metric | value |\n|---|---|")
    print(f"| requests sent | {tally.sent} |")
    print(f"| answered | {answered} |")
    for label, count in sorted(tally.statuses.items()):
        print(f"| answered `{label}` | {count} |")
    print(f"| lost (no HTTP answer) | {lost} {dict(tally.lost) if lost else ''} |")
    print(f"| page statuses (200s) | {dict(sorted(tally.page_statuses.items()))} |")
    print(f"| throughput | {answered / elapsed:.1f} req/s, {tally.pages_ok / elapsed:.1f} pages/s |")
    print(f"| latency p50 (200s) | {percentile(tally.latencies, 50) * 1000:.0f} ms |")
    print(f"| latency p99 (200s) | {percentile(tally.latencies, 99) * 1000:.0f} ms |")
    if samples:
        print("\nservice RSS (MB) over time:\n| t (s) | RSS (MB) |\n|---|---|")
        step = max(1, len(samples) // 12)
        shown = samples[::step] if samples[::step][-1] == samples[-1] else [*samples[::step], samples[-1]]
        for t, value in shown:
            print(f"| {t:.0f} | {value:.0f} |")
        values = [value for _, value in samples]
        print(f"RSS min={min(values):.0f} MB max={max(values):.0f} MB last={values[-1]:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load bench for the OCR service (see module docstring).")
    sub = parser.add_subparsers(dest="command")
    stub_parser = sub.add_parser("stub", help="run only the faulty stub (used internally)")
    for p in (parser, stub_parser):
        p.add_argument("--error-rate", type=float, default=0.05, help="share of page requests answered 5xx")
        p.add_argument("--latency-ms", default="20-400", help="stub latency range per page, e.g. 20-400")
        p.add_argument("--seed", type=int, default=1)
    stub_parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--max-concurrent-pages", type=int, default=32)
    parser.add_argument("--rss-every-s", type=float, default=5.0)
    parser.add_argument("--service-log", type=Path, default=Path("/tmp/bench-load-service.log"))
    args = parser.parse_args(argv)
    low, _, high = args.latency_ms.partition("-")
    latency = (float(low), float(high or low))

    if args.command == "stub":
        run_stub(args.port, args.error_rate, latency, args.seed)
        return 0

    stub_port, service_port = free_port(), free_port()
    stub_cmd = [sys.executable, "-m", "bench.load", "stub", "--port", str(stub_port), "--seed", str(args.seed),
                "--error-rate", str(args.error_rate), "--latency-ms", args.latency_ms]  # fmt: skip
    env = {
        **os.environ,
        "MODEL_SOURCE": "vllm",
        "VLLM_BASE_URL": f"http://127.0.0.1:{stub_port}/v1",
        "MAX_CONCURRENT_PAGES": str(args.max_concurrent_pages),
        "VLLM_RETRY_BACKOFF_S": "0.05",
        "JOBS_DB": str(Path(tempfile.gettempdir()) / f"bench-load-jobs-{os.getpid()}.db"),  # not the work tree
    }
    service_cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                   "--port", str(service_port), "--no-access-log", "--log-level", "warning"]  # fmt: skip
    stub = subprocess.Popen(stub_cmd, cwd=ROOT)
    log_file = args.service_log.open("wb")  # the engine logs every injected 5xx it retries
    service = subprocess.Popen(service_cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{service_port}"
    try:
        wait_http(f"http://127.0.0.1:{stub_port}/health", 30, stub)
        wait_http(f"{url}/ready", 60, service)
        print(f"service pid {service.pid} at {url}; stub at {stub_port}; running {args.minutes:g} min", flush=True)
        started = time.monotonic()
        tally, samples = asyncio.run(drive(args, url, service.pid))
        elapsed = time.monotonic() - started
        alive = service.poll() is None
    finally:
        for process in (service, stub):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
            if process.poll() is None:
                process.kill()
        log_file.close()
    report(args, tally, samples, elapsed)
    log_lines = args.service_log.read_text(errors="replace").splitlines()
    retried = sum("retry" in line for line in log_lines)
    print(f"service log {args.service_log}: {len(log_lines)} lines, {retried} engine retries of injected 5xx")
    print(f"service exit code after SIGTERM: {service.returncode}; alive during run: {alive}")
    return 0 if alive and not tally.lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
