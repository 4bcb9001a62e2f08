"""Replicas under fire: three service processes on one PostgreSQL, a random one killed -9 and restarted every 30 s.

    uv run python -m bench.replicas --duration 600 --kill-every 30

Jobs are submitted continuously (a closed loop of `--clients` submitters, each to a random live replica) against
the vLLM stand-in; a submission that got no answer is retried with the same `Idempotency-Key` (the replica may have
died after creating the job). Every page carries a unique marker, so the stand-in knows exactly which page it was sent.
At each kill the pages leased by the killed replica are read from the database: those may be computed again.
Reported (JSON on stdout, and `--out`):
- jobs lost: submitted (202) but not `succeeded` at the end (must be 0);
- pages computed twice outside the killed leases (must be 0), and inside them;
- throughput: pages finished per second over the run;
- claim latency: from a job's 202 to the stand-in receiving its first page (queueing included), p50/p95/max.
Needs Debian's PostgreSQL binaries (as the tests do); the stand-in runs in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.replicas.cluster import Replica, replica_env, start_cluster
from tests.support.documents import make_marked_image, page_id_of
from tests.support.openai_stub import Reply, StubRequest, StubVLLM
from tests.support.postgres import PostgresServer

TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def document(first_id: int, pages: int) -> bytes:
    """A PDF of `pages` small pages whose markers are first_id, first_id + 1, ..."""
    images = [make_marked_image(first_id + k, 170, 220) for k in range(pages)]
    out = io.BytesIO()
    images[0].save(out, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return out.getvalue()


class Engine:
    """The stand-in's answers, after `delay_s`; records when each marked page was first received."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.sent: Counter[int] = Counter()
        self.first_seen: dict[int, float] = {}
        self._lock = threading.Lock()

    async def __call__(self, request: StubRequest) -> Reply:
        import asyncio

        page = page_id_of(request.image)
        assert page is not None
        with self._lock:
            self.sent[page] += 1
            self.first_seen.setdefault(page, time.monotonic())
        await asyncio.sleep(self.delay_s)
        return Reply(text=f"page {page}")


class Bench:
    def __init__(self, args: argparse.Namespace, replicas: list[Replica], database: str, engine: Engine) -> None:
        self.args = args
        self.replicas = replicas
        self.database = database
        self.engine = engine
        self.lock = threading.Lock()
        self.next_id = 1
        self.jobs: dict[str, tuple[int, float]] = {}  # job id -> (first page id, time of its 202)
        self.finished: dict[str, str] = {}
        self.killed_pages: set[int] = set()  # page markers leased by a replica when it was killed
        self.kills = 0
        self.submit_errors: Counter[str] = Counter()
        self.stop = threading.Event()

    def live(self) -> Replica:
        return random.choice([replica for replica in self.replicas if replica.alive] or self.replicas)

    def submitter(self) -> None:
        pages = self.args.pages
        while not self.stop.is_set():
            with self.lock:
                first = self.next_id
                self.next_id += pages
            data = document(first, pages)
            job_id = None
            while job_id is None and not self.stop.is_set():
                replica = self.live()
                try:
                    response = httpx.post(
                        f"{replica.url}/api/jobs",
                        files={"file": ("d.pdf", data)},
                        headers={"Idempotency-Key": f"bench-{first}"},  # a retry after a lost 202 is the same job
                        timeout=30,
                    )
                except httpx.TransportError as exc:
                    self.submit_errors[type(exc).__name__] += 1
                    time.sleep(0.1)
                    continue
                if response.status_code == 202:
                    job_id = response.json()["id"]
                    with self.lock:
                        self.jobs[job_id] = (first, time.monotonic())
                else:
                    self.submit_errors[str(response.status_code)] += 1
                    time.sleep(0.2)
            if job_id is not None:
                self.wait(job_id, deadline=float("inf"))

    def wait(self, job_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                job = httpx.get(f"{self.live().url}/api/jobs/{job_id}", timeout=10).json()
            except (httpx.TransportError, ValueError):
                time.sleep(0.1)
                continue
            if job.get("status") in TERMINAL:
                with self.lock:
                    self.finished[job_id] = job["status"]
                return
            if self.stop.is_set() and deadline == float("inf"):
                return  # the drain at the end waits for it
            time.sleep(0.1)

    def killer(self) -> None:
        while not self.stop.wait(self.args.kill_every):
            victim = random.choice(self.replicas)
            assert victim.process is not None
            pid = victim.process.pid
            victim.kill9()
            self.kills += 1
            self.record_killed_leases(pid)
            victim.start()
            try:
                victim.wait_ready(120)
            except AssertionError as exc:
                print(f"restart of {victim.name} failed: {exc}", flush=True)

    def record_killed_leases(self, pid: int) -> None:
        """The pages the killed process held: the only ones that may be computed twice."""
        with psycopg.connect(self.database) as conn:
            rows = conn.execute(
                "SELECT job_id, page FROM page_tasks WHERE state = 'leased' AND worker LIKE %s", (f"%:{pid}:%",)
            ).fetchall()
        with self.lock:
            for job_id, page in rows:
                if job_id in self.jobs:
                    self.killed_pages.add(self.jobs[job_id][0] + page - 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    root.chmod(0o755)
    server = PostgresServer.start_new(root)
    try:
        database = server.create_database()
        engine = Engine(args.page_delay)
        with StubVLLM(engine) as stub:
            env = replica_env(
                stub.base_url,
                database,
                JOB_LEASE_S=str(args.lease),
                JOBS_CONCURRENCY="2",
                JOBS_CLAIM_BATCH=str(args.batch),
                MAX_CONCURRENT_PAGES="8",
                KEY_MAX_PAGES_IN_FLIGHT="100000",
                MAX_QUEUED_PAGES="100000",
            )
            replicas = start_cluster([f"r{i}" for i in range(args.replicas)], env, root / "logs")
            bench = Bench(args, replicas, database, engine)
            threads = [threading.Thread(target=bench.submitter, daemon=True) for _ in range(args.clients)]
            threads.append(threading.Thread(target=bench.killer, daemon=True))
            started = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(args.duration)
            bench.stop.set()
            elapsed = time.monotonic() - started
            for thread in threads:
                thread.join(180)
            for replica in replicas:
                if not replica.alive:
                    replica.start()
                    replica.wait_ready(120)
            drain = time.monotonic() + args.lease + 120
            for job_id in list(bench.jobs):
                if job_id not in bench.finished:
                    bench.wait(job_id, drain)
            for replica in replicas:
                replica.stop()
            violations = stub.violations
    finally:
        server.destroy()

    jobs = bench.jobs
    statuses = Counter(bench.finished.get(job_id, "unfinished") for job_id in jobs)
    expected = {first + k for first, _ in jobs.values() for k in range(args.pages)}
    twice = {page for page, count in engine.sent.items() if count > 1}
    latencies = [engine.first_seen[first] - at for first, at in jobs.values() if first in engine.first_seen]
    pages_done = statuses.get("succeeded", 0) * args.pages
    return {
        "duration_s": round(elapsed, 1),
        "replicas": args.replicas,
        "kill_every_s": args.kill_every,
        "kills": bench.kills,
        "job_lease_s": args.lease,
        "pages_per_job": args.pages,
        "page_delay_s": args.page_delay,
        "jobs_submitted": len(jobs),
        "jobs_by_status": dict(statuses),
        "jobs_lost": len(jobs) - statuses.get("succeeded", 0),
        "pages_never_sent": len(expected - set(engine.sent)),
        "pages_computed_twice_outside_killed_leases": len(twice - bench.killed_pages),
        "pages_computed_twice_inside_killed_leases": len(twice & bench.killed_pages),
        "pages_in_killed_leases": len(bench.killed_pages),
        "throughput_pages_per_s": round(pages_done / elapsed, 1),
        "claim_latency_s": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p95": round(percentile(latencies, 0.95), 3),
            "max": round(max(latencies, default=float("nan")), 3),
            "mean": round(statistics.fmean(latencies), 3) if latencies else None,
        },
        "submit_errors": dict(bench.submit_errors),
        "stand_in_violations": len(violations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of submitting and killing (600)")
    parser.add_argument("--kill-every", type=float, default=30, help="seconds between kills (30)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6, help="concurrent submitters, each waits for its job (6)")
    parser.add_argument("--pages", type=int, default=5, help="pages per job (5)")
    parser.add_argument("--page-delay", type=float, default=0.05, help="the stand-in's seconds per page (0.05)")
    parser.add_argument("--lease", type=float, default=5, help="JOB_LEASE_S of the replicas (5)")
    parser.add_argument("--batch", type=int, default=2, help="JOBS_CLAIM_BATCH of the replicas (2)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
