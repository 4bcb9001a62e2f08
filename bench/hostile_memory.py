"""Memory under hostile input: does the service give back what hostile requests take?

Run by hand (not part of the test suite; `tests/hostile/test_hostile_input.py::test_memory_returns_to_baseline`
is its reduced, in-process version):

    uv run python -m bench.hostile_memory --requests 1000
    uv run python -m bench.hostile_memory --requests 300 --report-every 50

It starts the vLLM stand-in (`tests/support/openai_stub.py`) in this process and the service
(`uvicorn app.main:app`, MODEL_SOURCE=vllm, UPLOAD_TIMEOUT_S=1 so the trickled upload takes a
second, every other setting at its default) in a subprocess, so the RSS measured is the
service's alone. After a warm-up pass over every case of `tests/hostile/cases.py` it records
the service's RSS as the baseline, then sends `--requests` requests cycling through the set,
printing RSS every `--report-every` requests and the final delta. What to expect: the rows
stay within a few tens of MiB of the baseline; the peak (VmHWM) is one heavy request's worth
above it (the 80 M pixel PNG decodes to ~80 MB). A steady climb row after row is a leak.

Measured (2 shared cores, 1,000 requests): RSS rose to +90 MiB by request 600 and then stayed
flat to 1,000, peak 416 MiB. With `MALLOC_ARENA_MAX=2` in the environment the same run stays
within +17 MiB: the plateau is glibc keeping one malloc arena per worker thread (anyio's pool),
not a leak. `MALLOC_ARENA_MAX=2` is worth setting in the container if RSS matters.

Exit status 1 when a case got another answer than `cases.py` expects (known bugs aside) or the
service died.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import print_header, print_table
from tests.hostile.cases import CASES, Case, NoAnswer, send
from tests.support.openai_stub import StubVLLM

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def proc_status_mib(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_service(stub: StubVLLM, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MODEL_SOURCE": "vllm",
        "VLLM_BASE_URL": stub.base_url,
        "VLLM_RETRY_BACKOFF_S": "0.01",
        "UPLOAD_TIMEOUT_S": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", HOST, "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--log-level", "warning", "--no-access-log"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited with {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the service was not ready within 120 s")


def answer_of(case: Case, port: int) -> tuple[tuple[int, str | None], float]:
    """(status, code) the service gave, and seconds from the last byte to the whole answer."""
    try:
        outcome = send(case.build(), HOST, port)
    except (NoAnswer, OSError) as exc:
        return (0, f"no answer: {exc}"), float("nan")
    try:
        body = json.loads(outcome.body)
        code = body["error"]["code"] if "error" in body else None
    except (ValueError, KeyError, TypeError):
        code = "unparsable body"
    return (outcome.status, code), outcome.latency_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="hostile requests after the warm-up")
    parser.add_argument("--report-every", type=int, default=100, help="RSS row every N requests")
    args = parser.parse_args(argv)

    print_header("hostile input: service RSS over repeated hostile requests")
    unexpected: Counter[str] = Counter()
    with StubVLLM() as stub:
        port = free_port()
        service = start_service(stub, port)
        try:
            for case in CASES:  # warm-up: every code path, caches and allocator arenas once
                answer_of(case, port)
            baseline = proc_status_mib(service.pid, "VmRSS")
            rows: list[list[object]] = [[0, round(baseline, 1), 0.0, "-", "-", 0]]
            latencies: list[float] = []
            for sent in range(1, args.requests + 1):
                case = CASES[(sent - 1) % len(CASES)]
                answer, latency = answer_of(case, port)
                latencies.append(latency)
                if answer != (case.status, case.code) and not case.known_bug:
                    unexpected[f"{case.name}: {answer}"] += 1
                if service.poll() is not None:
                    print(f"the service died (exit {service.returncode}) after {sent} requests")
                    return 1
                if sent % args.report_every == 0 or sent == args.requests:
                    rss = proc_status_mib(service.pid, "VmRSS")
                    rows.append(
                        [
                            sent,
                            round(rss, 1),
                            round(rss - baseline, 1),
                            round(statistics.median(latencies) * 1000, 1),
                            round(max(latencies) * 1000, 1),
                            sum(unexpected.values()),
                        ]
                    )
                    latencies = []
            peak = proc_status_mib(service.pid, "VmHWM")
            final = proc_status_mib(service.pid, "VmRSS")
        finally:
            service.terminate()
            try:
                service.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.kill()
    print_table(["requests", "RSS MiB", "Δ baseline MiB", "p50 ms", "max ms", "unexpected"], rows)
    print(f"cases: {len(CASES)}; baseline {baseline:.1f} MiB; final {final:.1f} MiB ({final - baseline:+.1f} MiB)")
    print(f"peak (VmHWM): {peak:.1f} MiB")
    for what, count in unexpected.most_common():
        print(f"unexpected answer x{count}: {what}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
