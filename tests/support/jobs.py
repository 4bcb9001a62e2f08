"""Helpers for the job tests: submit a document, poll a job until a condition holds (bounded, no fixed sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

Job = dict[str, Any]


def submit(url: str, document: bytes, *, headers: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/jobs", files={"file": ("doc.pdf", document)}, data=fields, headers=headers, timeout=30
    )


def wait_job(
    url: str,
    job_id: str,
    predicate: Callable[[Job], bool],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Job:
    """Poll GET /api/jobs/{id} until `predicate(job)`; fails with the last state seen."""
    deadline = time.monotonic() + timeout
    job: Job = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=10)
        response.raise_for_status()
        job = response.json()
        if predicate(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached the expected state; last seen: {job}")


def wait_status(url: str, job_id: str, *statuses: str, headers: dict[str, str] | None = None) -> Job:
    return wait_job(url, job_id, lambda job: job["status"] in statuses, headers=headers)
