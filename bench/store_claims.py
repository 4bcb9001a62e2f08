"""Claim throughput of the job store alone: page claims + fenced completions per second.

Run by hand (not part of the test suite):

    uv run python -m bench.store_claims                      # a throwaway PostgreSQL, durable settings
    uv run python -m bench.store_claims --url postgresql://user:pass@host:5432/db
    uv run python -m bench.store_claims --store sqlite       # the embedded default, for comparison

Method: `--jobs` jobs of `--pages` pages are created, then `--workers` asyncio workers, each with its own
worker id (as replicas would), loop: `claim(limit=--batch)`, then `complete()` each leased page with a small
finished page (the real JSON payload of a one-line page), until no page is left. A page counts once it was
claimed and its completion accepted; the figure is pages per second over the whole run (claims + completions
of every page, plus each job's last-page check). It also reports claim latency (median, p99) and checks that
every page was stored exactly once. Leases are not renewed (the run is far shorter than a lease).

Without `--url` the benchmark starts its own PostgreSQL (Debian binaries, as the tests do) with PostgreSQL's
default durability (fsync on): the figure an operator would see on one disk (claims and completions commit
asynchronously by design, everything else synchronously: see `PostgresJobStore._transaction`). `--fast` turns fsync
off (what the test suite uses), for comparison. CPU per page (this process + every `postgres` process) is reported
too: on a shared box the wall-clock rate depends on the neighbours, the CPU cost much less; "/ s at that CPU cost"
is what all cores would sustain, idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.jobs.store import NewJob, PostgresJobStore, SqliteJobStore, SqlJobStore
from app.results import FinishedPage, PageResult
from bench.common import machine_line

LEASE_S = 300.0
TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_s() -> float:
    """CPU seconds used so far by every `postgres` process on this machine (the benchmark's server alone when
    it started its own; 0 where /proc is missing)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def finished(number: int) -> FinishedPage:
    result = PageResult(page=number, text=f"Page {number}: a line of text.", width=1240, height=1754,
                        finish_reason="stop", tokens=12, seconds=1.2, status="ok", attempts=1)  # fmt: skip
    return FinishedPage(result, [])


async def run(store: SqlJobStore, jobs: int, pages: int, workers: int, batch: int) -> dict[str, float]:
    for index in range(jobs):
        new = NewJob(owner=f"key:{index % 4}", pages=list(range(1, pages + 1)), pages_spec=None, password=None,
                     callback_url=None, filename=None)  # fmt: skip
        await store.create(new, b"%PDF-1.7 not read by this benchmark")
    claim_s: list[float] = []
    done = 0
    refused = 0

    async def worker(name: str) -> None:
        nonlocal done, refused
        while True:
            started = time.perf_counter()
            leases = await store.claim(name, limit=batch, lease_s=LEASE_S)
            claim_s.append(time.perf_counter() - started)
            if not leases:
                return
            for lease in leases:
                completion = await store.complete(lease, finished(lease.page))
                if completion.accepted:
                    done += 1
                else:
                    refused += 1

    started, client_cpu, server_cpu = time.perf_counter(), own_cpu_s(), server_cpu_s()
    await asyncio.gather(*(worker(f"bench-{index}") for index in range(workers)))
    elapsed = time.perf_counter() - started
    client_cpu, server_cpu = own_cpu_s() - client_cpu, server_cpu_s() - server_cpu
    stored = 0
    for record in await store.list_jobs(limit=jobs):
        stored += len(await store.pages(record.id))
    claim_s.sort()
    return {
        "pages": done,
        "refused": refused,
        "stored": stored,
        "seconds": elapsed,
        "per_s": done / elapsed,
        "claim_p50_ms": statistics.median(claim_s) * 1000,
        "claim_p99_ms": claim_s[int(len(claim_s) * 0.99)] * 1000,
        "client_cpu_ms": client_cpu * 1000 / max(done, 1),
        "server_cpu_ms": server_cpu * 1000 / max(done, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--url", help="an existing PostgreSQL database (default: start a throwaway server)")
    parser.add_argument("--fast", action="store_true", help="throwaway server with fsync off (as the tests)")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pool", type=int, default=8, help="JOBS_DB_POOL_SIZE")
    args = parser.parse_args()

    print(machine_line())
    print("command: python -m bench.store_claims " + " ".join(sys.argv[1:]))
    server = None
    scratch = Path(tempfile.mkdtemp(prefix="store-claims-"))
    try:
        if args.store == "sqlite":
            store: SqlJobStore = SqliteJobStore(scratch / "jobs.db", ttl_s=3600, max_bytes=10**12)
            where = f"SQLite file {scratch / 'jobs.db'}"
        else:
            url = args.url
            if url is None:
                from tests.support.postgres import PostgresServer

                os.chmod(scratch, 0o755)
                server = PostgresServer.start_new(scratch / "pg", durable=not args.fast)
                url = server.create_database()
                where = f"throwaway PostgreSQL ({'fsync off' if args.fast else 'default durability'})"
            else:
                where = "PostgreSQL at the given URL"
            store = PostgresJobStore(url, ttl_s=3600, max_bytes=10**12, pool_size=args.pool)
        result = asyncio.run(run(store, args.jobs, args.pages, args.workers, args.batch))
        store.close()
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    total = args.jobs * args.pages
    print(f"store: {where}; {args.jobs} jobs x {args.pages} pages, {args.workers} workers, batch {args.batch}")
    print()
    cpu_ms = result["client_cpu_ms"] + result["server_cpu_ms"]
    cores = os.cpu_count() or 1
    print("| pages | seconds | claims + completions / s | claim p50 ms | claim p99 ms | CPU ms / page (client + "
          "server) | / s at that CPU cost on all cores | refused | stored |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {result['pages']:.0f} | {result['seconds']:.2f} | {result['per_s']:.0f} | {result['claim_p50_ms']:.2f} "
          f"| {result['claim_p99_ms']:.2f} | {cpu_ms:.2f} ({result['client_cpu_ms']:.2f} + "
          f"{result['server_cpu_ms']:.2f}) | {cores * 1000 / cpu_ms:.0f} | {result['refused']:.0f} "
          f"| {result['stored']:.0f} |")  # fmt: skip
    if result["pages"] != total or result["stored"] != total or result["refused"]:
        print(f"FAILED: expected {total} pages claimed, completed and stored once each")
        sys.exit(1)


if __name__ == "__main__":
    main()
